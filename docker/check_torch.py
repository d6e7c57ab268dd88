"""Build-time check that the image got the torch build it was meant to get.

    python check_torch.py cpu    fails if torch is a CUDA build, or CUDA packages were installed
    python check_torch.py cuda   fails if torch is a CPU-only build

A CUDA wheel in a CPU image works, but carries several GB of CUDA libraries it never uses; a CPU
wheel in a CUDA image builds fine and then never uses the GPU. Either way the build should stop.
"""

from __future__ import annotations

import sys
from importlib import metadata


def problems(build: str, cuda_version: str | None, distributions: list[str]) -> list[str]:
    """What is wrong with a torch of `cuda_version` (torch.version.cuda) among `distributions`."""
    if build == "cuda":
        return [] if cuda_version else ["torch is a CPU-only build; pass the CUDA wheel index in TORCH_PIP_ARGS"]
    if build != "cpu":
        return [f"unknown build {build!r}: expected cpu or cuda"]
    out = [f"torch is a CUDA {cuda_version} build"] if cuda_version else []
    cuda_packages = sorted(d for d in distributions if d.lower().startswith("nvidia-") or d.lower() == "triton")
    if cuda_packages:
        out.append(f"CUDA packages installed: {', '.join(cuda_packages)}")
    if out:
        out.append("pass a CPU wheel index in TORCH_PIP_ARGS")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    import torch

    found = problems(argv[0], torch.version.cuda, [d.metadata["Name"] for d in metadata.distributions()])
    for line in found:
        print(f"check_torch: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
