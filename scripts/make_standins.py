"""Write offline stand-ins of every Hub source the full profile reads, in the real formats (rehearsal/standins.py).

    python scripts/make_standins.py --size small                    # -> standins/small (seconds, ~32 MB)
    python scripts/make_standins.py --size real --out /data/standins --images 2000   # real model sizes (~7 GB)
    python scripts/make_standins.py --size small --check            # then load everything offline, as the course does

A finished build of the same size and version is left alone (``--force`` rebuilds). The manifest
``<out>/standins.json`` lists the ``MMPHI_*`` settings in two spellings: local paths (``settings_local``) and Hub
ids resolved through ``HF_HUB_CACHE=<out>/hub`` with ``HF_HUB_OFFLINE=1`` (``settings_hub``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["small", "real"], default="small",
                        help="small: tiny widths, 80 COCO images; real: the real model sizes (default: small)")
    parser.add_argument("--out", default=None, help="output folder (default: standins/<size> in the repository)")
    parser.add_argument("--images", type=int, default=None,
                        help="--size real only: COCO train2017 images (default 2000; val2017 gets a tenth)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished build is there")
    parser.add_argument("--check", action="store_true",
                        help="afterwards, load every stand-in offline in a fresh process (HF_HUB_OFFLINE=1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.images is not None and args.size != "real":
        parser.error("--images applies to --size real only")

    from rehearsal import standins

    out = Path(args.out) if args.out else ROOT / "standins" / args.size
    start = time.perf_counter()
    manifest = standins.build_standins(out, args.size, images=args.images, force=args.force,
                                       progress=not args.quiet)
    print(standins.summary(manifest))
    print(f"manifest: {out / 'standins.json'} ({time.perf_counter() - start:.1f} s)")
    if args.check:
        start = time.perf_counter()
        seen = standins.check_standins_in_subprocess(out)
        print(f"offline check passed ({time.perf_counter() - start:.1f} s): {json.dumps(seen)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
