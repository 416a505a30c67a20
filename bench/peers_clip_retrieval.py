"""clip-retrieval's command line, with extra open_clip architectures registered first.

clip-retrieval loads open_clip models as ``open_clip:ARCH/PRETRAINED``; an architecture that open_clip
does not ship (here ``wclip-demo``) must be registered in the process before the CLI parses it. Run it
with the clip-retrieval virtualenv's Python (bench_peers.py sets it up under .bench/clip-retrieval/):

    .bench/clip-retrieval/bin/python bench/peers_clip_retrieval.py --model-config pipeline/assets/wclip-demo.json \
        inference --input_dataset 'shards/{00000..00011}.tar' --input_format webdataset ... \
        --clip_model 'open_clip:wclip-demo//abs/path/wclip-demo.safetensors'

Everything after the ``--model-config PATH`` pairs goes to ``clip-retrieval`` unchanged.
"""

import sys


def main():
    argv = sys.argv[1:]
    configs = []
    while len(argv) >= 2 and argv[0] == "--model-config":
        configs.append(argv[1])
        argv = argv[2:]
    import open_clip

    for path in configs:
        open_clip.add_model_config(path)
    from clip_retrieval.cli import main as clip_retrieval_main

    sys.argv = ["clip-retrieval", *argv]
    clip_retrieval_main()


if __name__ == "__main__":  # clip-retrieval's logger processes are spawned and re-import this module
    main()
