// The before/after sliders, and what the browser test reads: data-loaded="true" on the body
// once every image has decoded, data-overflow (page wider than the window: 1, else 0) and
// data-clipped (chart labels that run past their chart's edge).
window.addEventListener('load', function () {
  Array.prototype.forEach.call(document.querySelectorAll('.compare-figure'), function (f) {
    var before = f.querySelector('.before'), slider = f.querySelector('.slider');
    var show = function () {
      before.style.clipPath = 'inset(0 ' + (100 - slider.value) + '% 0 0)';
    };
    slider.addEventListener('input', show);
    show();
  });
  var images = Array.prototype.slice.call(document.images);
  var clipped = 0;
  Array.prototype.forEach.call(document.querySelectorAll('svg.chart'), function (svg) {
    var width = svg.viewBox.baseVal.width;
    Array.prototype.forEach.call(svg.querySelectorAll('text'), function (t) {
      var box = t.getBBox();
      if (box.x < 0 || box.x + box.width > width + 0.5) { clipped += 1; }
    });
  });
  var body = document.body;
  body.setAttribute('data-images', String(images.length));
  body.setAttribute('data-overflow',
                    document.documentElement.scrollWidth > window.innerWidth ? '1' : '0');
  body.setAttribute('data-clipped', String(clipped));
  body.setAttribute('data-loaded', images.every(function (e) {
    return e.complete && e.naturalWidth > 0;
  }) ? 'true' : 'false');
});
