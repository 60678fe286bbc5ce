"""Hugging Face Space / local entry point: ``python app.py`` launches the demo of notebook 05.

It loads the assistant exported by notebook 03 (``outputs/<profile>/03_qlora_instruct/merged``; in the tiny
profile it is trained on the spot, with a NOTICE, when missing) and serves the gradio app of
:mod:`helpers.demo`: image upload, typed or spoken questions, a multi-turn chat with streamed answers.
``python app.py --help`` lists the options; a Space sets ``GRADIO_SERVER_NAME=0.0.0.0`` itself.
"""
from helpers.demo import main

if __name__ == "__main__":
    main()
