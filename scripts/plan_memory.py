"""The memory plan of one stage on one GPU, from the command line (``helpers.planning.memory_plan.show``).

``python scripts/plan_memory.py --stage instruct --gpu T4 [--batch-size 8] [--no-checkpointing] [--loss model]
[--json plan.json]``
"""
import argparse
import json

from helpers.planning import memory_plan as mp


def main(argv=None):
    parser = argparse.ArgumentParser(description="Estimate the GPU memory of a course stage.")
    parser.add_argument("--profile", default="full")
    parser.add_argument("--stage", default="instruct", choices=sorted(mp.STAGES))
    parser.add_argument("--gpu", default="T4", help=f"one of {sorted(mp.GPUS)}")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-length", type=int)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--precision", default="auto", choices=["auto", *mp.PRECISIONS])
    parser.add_argument("--grad-accum", type=int, help="default: the profile's")
    parser.add_argument("--loss", default="answer", choices=list(mp.LOSSES))
    parser.add_argument("--attention", default="auto", choices=["auto", "efficient", "math"])
    parser.add_argument("--json", help="also write the plan as JSON here")
    args = parser.parse_args(argv)
    plan = mp.show(args.profile, args.stage, gpu=args.gpu, batch_size=args.batch_size, seq_length=args.seq_length,
                   gradient_checkpointing=False if args.no_checkpointing else None, precision=args.precision,
                   grad_accum=args.grad_accum, loss=args.loss, attention=args.attention)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.to_dict(), f, indent=2)


if __name__ == "__main__":
    main()
