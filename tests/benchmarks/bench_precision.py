"""What bf16 autocast costs in quality: zoo models evaluated in fp32 and in bf16 on one GPU.

Run (on a CUDA machine):  python tests/benchmarks/bench_precision.py --data ../shared/data

Prints, per model, the mean PSNR of ``restorer.quality.evaluate`` (reference conventions) with the
net in fp32 and under bf16 autocast with channels_last, as the restore actor runs it on CUDA.
"""

import argparse
import json

import torch

from restorer.quality.evaluate import evaluate
from restorer.weights.zoo import get_model

CASES = [
    ("denoise-gray", "set12", {"task": "denoise", "sigma": 25}),
    ("restore-default", "set12", {"task": "denoise", "sigma": 25}),
    ("jpeg", "classic5", {"task": "jpeg", "quality": 10}),
    ("sr-x2", "set5", {"task": "sr", "scale": 2}),
]


class Autocast(torch.nn.Module):
    """``net`` under autocast to ``dtype``, channels_last input, float32 output."""

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net, dtype
        self.channels, self.scale = net.channels, net.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.dtype):
            return self.net(x.contiguous(memory_format=torch.channels_last)).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="../shared/data")
    args = parser.parse_args()
    for name, folder, kwargs in CASES:
        net = get_model(name).net.cuda().to(memory_format=torch.channels_last)
        fp32 = evaluate(net, f"{args.data}/{folder}", **kwargs)["psnr"]
        bf16 = evaluate(Autocast(net, torch.bfloat16), f"{args.data}/{folder}", **kwargs)["psnr"]
        print(json.dumps({"model": name, "set": folder, **kwargs, "fp32_psnr": round(fp32, 3),
                          "bf16_psnr": round(bf16, 3), "bf16_minus_fp32": round(bf16 - fp32, 3)}))


if __name__ == "__main__":
    main()
