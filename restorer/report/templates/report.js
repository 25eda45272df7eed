// Sets data-loaded="true" on the body once every image has decoded (the browser test reads it).
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  document.body.setAttribute('data-images', String(images.length));
  document.body.setAttribute('data-loaded', images.every(function (e) {
    return e.complete && e.naturalWidth > 0;
  }) ? 'true' : 'false');
});
