"""The bare single-process loop that bench_peers.py compares `wclip score` with.

What a person writes in an afternoon: read each tar with tarfile, decode with PIL, the model's own
preprocess, both towers in batches, whitening in NumPy from the stats file's mean and whitening
matrix; per shard an .npz of keys and log-likelihoods. One process, no error handling. torch uses its
default intra-op threads (all cores) unless ``--threads`` says otherwise (``--threads 1``: the loop on one
core, tool ``loop-1t`` of bench_peers.py).

    .venv/bin/python bench/peers_loop.py --stats STATS.safetensors --output DIR SHARD.tar [SHARD.tar ...]

Prints one JSON line: {"rows": N, "shards": S}.
"""

import argparse
import io
import json
import os
import tarfile

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

import pipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stats", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores); 1: a one-core loop")
    ap.add_argument("shards", nargs="+")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, preprocess, tokenizer = pipeline.load_clip("wclip-demo")
    with safe_open(args.stats, "numpy") as f:
        normalize = bool(json.loads(f.metadata()["wclip"]).get("normalize"))
        stats = {t: (f.get_tensor(f"{t}.mean"), f.get_tensor(f"{t}.whitening")) for t in ("image", "text")}

    def loglik(tower, emb):
        emb = emb.double().numpy()
        if normalize:
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        mean, whitening = stats[tower]
        w = (emb - mean) @ whitening
        return -0.5 * (whitening.shape[1] * np.log(2 * np.pi) + (w * w).sum(1))

    os.makedirs(args.output, exist_ok=True)
    rows = 0
    for url in args.shards:
        members = {}
        with tarfile.open(url) as tar:
            for m in tar:
                if m.isfile():
                    members[m.name] = tar.extractfile(m).read()
        keys = sorted(n[:-4] for n in members if n.endswith(".jpg"))
        out = {"image": [], "text": []}
        for start in range(0, len(keys), args.batch_size):
            batch = keys[start:start + args.batch_size]
            images = torch.stack([preprocess(Image.open(io.BytesIO(members[k + ".jpg"])).convert("RGB")) for k in batch])
            texts = tokenizer([members[k + ".txt"].decode() for k in batch])
            with torch.inference_mode():
                out["image"].append(loglik("image", model.encode_image(images)))
                out["text"].append(loglik("text", model.encode_text(texts)))
        name = os.path.basename(url).rsplit(".", 1)[0]
        np.savez(os.path.join(args.output, name + ".npz"), key=np.array(keys),
                 image_loglik=np.concatenate(out["image"]), text_loglik=np.concatenate(out["text"]))
        rows += len(keys)
    print(json.dumps({"rows": rows, "shards": len(args.shards)}))


if __name__ == "__main__":
    main()
