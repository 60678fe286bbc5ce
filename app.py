"""Hugging Face Space / local entry point: ``python app.py`` launches the demo of notebook 05.

It loads the assistant exported by notebook 03 (``outputs/<profile>/03_qlora_instruct/merged``; in the tiny
profile it is trained on the spot, with a NOTICE, when missing) and serves the gradio app of
:mod:`helpers.demo`: image upload, typed or spoken questions, a multi-turn chat with streamed answers.
``python app.py --help`` lists the options; a Space sets ``GRADIO_SERVER_NAME=0.0.0.0`` itself.
"""
import argparse
import os

from helpers.config import Paths, get_profile
from helpers.demo import DemoBackend, build_app


def main(argv=None):
    parser = argparse.ArgumentParser(description="mmphi demo: ask about an image by text or voice")
    parser.add_argument("--profile", default=None, help="tiny or full (default: $MMPHI_PROFILE, else tiny)")
    parser.add_argument("--output", default=None, help="outputs folder (default: $MMPHI_OUTPUT_DIR or ./outputs)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="0.0.0.0 to serve other machines (Spaces set GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="a temporary public gradio.live link")
    parser.add_argument("--model", default=None,
                        help="serve this saved assistant (a folder with a LLaVA checkpoint and its processor, as "
                             "notebook 03 exports it) instead of the profile's")
    args = parser.parse_args(argv)
    profile = get_profile(args.profile)
    paths = None if args.model else Paths(profile, args.output)
    backend = DemoBackend.from_profile(profile, paths, checkpoint=args.model)
    build_app(backend).launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
