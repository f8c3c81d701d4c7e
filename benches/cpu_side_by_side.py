#!/usr/bin/env python3
"""CPU speed, measured side by side with HF transformers on issue 14's mid checkpoint (one run, interleaved).

  python benches/cpu_side_by_side.py make-mid [--out DIR]
      Writes the mid checkpoint (307.6 M parameters, llava-hf layout, float16 storage, random weights with
      HF's own init at initializer_range 0.02): CLIPVisionConfig(hidden 768, intermediate 3072, 12 layers,
      12 heads, image 336, patch 14, projection_dim 512, quick_gelu) and LlamaConfig(hidden 1024,
      intermediate 2816, 12 layers, 16 heads, 16 kv heads, vocab 32064, rope theta 1e4, rms 1e-5);
      projector gelu, vision layer -2, strategy `default`. Tokenizer, chat template and processor
      (CLIP 336 crop) come from tests/fixtures/tiny. Default DIR: target/llava-mid.

  python benches/cpu_side_by_side.py make-gguf --llama-cpp-src SRC [--model DIR] [--gguf OUT]
      Converts DIR to GGUF with llama.cpp's own scripts from its source tree SRC (see
      benches/llama_cpp_peer.py for how to get and build it): f32 and f16 decoders and an f32 image encoder.
      Default OUT: target/llava-mid-gguf.

  python benches/cpu_side_by_side.py run [--model DIR] [--server BIN] [--reps N] [--threads T] [--no-hf-batch]
                                        [--llama-cpp LLAMA_SERVER_BIN [--gguf OUT]]
      Starts our server on DIR (f32 compute) and loads HF's LlavaForConditionalGeneration on the same folder
      (f32, sdpa, PIL processor, torch threads T = 2), then for N interleaved repetitions measures, each with
      a new 640x480 image (never seen: cold):
        cold TTFT (HF: processor + generate of 1 token; ours: a streamed chat request to its first token),
          with the vision time (HF: get_image_features; ours: llava_image_encode_seconds_total)
        single-stream decode, 64 forced tokens, timed from the first token to the last (HF: min_new_tokens,
          a logits processor stamping each step; ours: ignore_eos, stream chunk times), and ours again
          with --cpu-f16-weights (a second server)
      and once each: ours with 16 concurrent streams (one shared image, then 16 different images; aggregate
      tok/s, decode-phase tok/s, TTFT p99, decode step at 16 vs 1) and HF's static batch of 16 (left-padded
      `generate`, which is what transformers offers without a server). It prints the weight-read floor: the
      decoder's f32 weight bytes per token over this machine's read bandwidth: the faster of torch's
      vectorised, threaded sum and our AVX-512 sum (benches/cpu_gemm.rs) over 1 GiB, best of 5 each.
      With --llama-cpp, llama.cpp's server runs the same requests as ours through the same OpenAI API
      (its f32 and f16 GGUF, one slot each for single streams, 16 slots for the concurrent runs; its vision
      time from llama-mtmd-cli on the same image), and the last column compares ours with the faster peer.

Needs: torch==2.15.0, transformers==5.24.0, pillow==13.0.0, safetensors, numpy, requests (make-gguf also
pyyaml, tqdm and sentencepiece, for llama.cpp's gguf-py and converter); a release build
(`cargo build --release`). Results go in benches/results/<date>-cpu-side-by-side.md.
"""

import argparse
import base64
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp_peer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny"
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
QUESTION = "What is shown in this image? Describe it."
FORCED = 64
STREAMS = 16

MID_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
    "pad_token_id": 32001, "projector_hidden_act": "gelu", "tie_word_embeddings": False,
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
    "image_seq_length": 576,
    "text_config": {
        "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12,
        "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32064, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "initializer_range": 0.02, "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 768, "intermediate_size": 3072,
        "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 336, "patch_size": 14,
        "projection_dim": 512, "hidden_act": "quick_gelu", "initializer_range": 0.02,
    },
}
COPIED = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
          "preprocessor_config.json", "processor_config.json", "generation_config.json"]


def make_mid(args):
    from make_fixtures import hub_name
    from safetensors.torch import load_file, save_file

    out = Path(args.out)
    torch.manual_seed(14)
    config = transformers.LlavaConfig.from_dict(MID_CONFIG)
    model = transformers.LlavaForConditionalGeneration(config).eval().to(torch.float16)
    n = sum(p.numel() for p in model.parameters())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # The hub's (transformers 4) tensor names, as llava-hf checkpoints have them.
    def name(k):  # the untied lm_head keeps its name on the hub too
        return k if k == "language_model.lm_head.weight" else hub_name(k)

    tensors = {name(k): v.contiguous() for k, v in load_file(str(tmp / "model.safetensors")).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(MID_CONFIG, torch_dtype="float16")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in COPIED:
        shutil.copyfile(TINY / f, out / f)
    shutil.rmtree(tmp)
    print(f"wrote {out}: {n / 1e6:.1f} M parameters, float16")


def new_image(seed):
    """A 640x480 photo-like image (smooth gradients plus noise), different for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    base = np.stack([np.sin(x / rng.uniform(20, 90) + c) * np.cos(y / rng.uniform(20, 90)) for c in range(3)], -1)
    pixels = (127 + 90 * base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def data_url(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def read_bandwidth_gbs(threads):
    """The faster of two read kernels over 1 GiB: torch's threaded, vectorised sum, and our AVX-512 sum
    (`cargo bench --bench cpu_gemm -- --read-floor`), each the best of 5; returns (GB/s, which)."""
    torch.set_num_threads(threads)
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)  # 1 GiB
    x.sum()
    best = min(timed(lambda: x.sum())[1] for _ in range(5))
    found = [(x.numel() * 4 / best / 1e9, "torch sum")]
    del x
    try:
        out = subprocess.run(["cargo", "bench", "-q", "--bench", "cpu_gemm", "--", "--read-floor"], cwd=ROOT,
                             env=dict(os.environ, RAYON_NUM_THREADS=str(threads)), capture_output=True,
                             text=True, timeout=900).stdout
        found += [(float(line.split()[2]), "AVX-512 sum") for line in out.splitlines()
                  if line.startswith("read bandwidth")]
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        print(f"our read kernel did not run ({e}); the floor uses torch's sum", flush=True)
    return max(found)


def timed(f):
    t0 = time.perf_counter()
    r = f()
    return r, time.perf_counter() - t0


def decoder_f32_bytes(config):
    """Bytes a decode step reads: every decoder weight except the embedding table (one row), in f32."""
    t = config["text_config"]
    h, inter, layers, v = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    return 4 * (layers * per_layer + h + v * h)


class Hf:
    def __init__(self, model_dir, threads):
        torch.set_num_threads(threads)
        self.processor = transformers.AutoProcessor.from_pretrained(model_dir, backend="pil")
        self.model = transformers.LlavaForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        self.prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def inputs(self, images):
        self.processor.tokenizer.padding_side = "left"
        return self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt",
                              padding=True)

    @torch.inference_mode()
    def ttft(self, img):
        t0 = time.perf_counter()
        inputs = self.inputs([img])
        vision = timed(lambda: self.model.model.get_image_features(pixel_values=inputs["pixel_values"]))[1]
        t1 = time.perf_counter()
        self.model.generate(**inputs, max_new_tokens=1, do_sample=False)
        # get_image_features ran outside generate: count generate's own time plus preprocessing.
        return (time.perf_counter() - t1) + (t1 - t0 - vision), vision, inputs["input_ids"].shape[1]

    @torch.inference_mode()
    def generate(self, images, new_tokens):
        """Seconds for the whole call, and the decode rate between the first and last token's logits."""
        stamps = []

        def stamp(input_ids, scores):  # a logits processor: called once per generated token
            stamps.append(time.perf_counter())
            return scores

        t0 = time.perf_counter()
        self.model.generate(**self.inputs(images), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=False, logits_processor=transformers.LogitsProcessorList([stamp]))
        total = time.perf_counter() - t0
        rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
        return total, rate


class Ours:
    def __init__(self, binary, model_dir, port, threads, extra=()):
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads), RUST_LOG="warn")
        self.model_name = "mid"
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [binary, "serve", "--model", model_dir, "--port", str(port), "--dtype", "f32",
             "--served-model-name", "mid", "--max-num-seqs", "32", *extra], env=env)
        llama_cpp_peer.wait_until_healthy(self.base, self.proc, "our server")

    def close(self):
        self.proc.terminate()
        self.proc.wait(60)

    def encode_seconds(self):
        text = requests.get(self.base + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith("llava_image_encode_seconds_total"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def stream(server, img_url, max_tokens, record):
    """One streamed chat request to server (ours or llama-server: the same OpenAI API); appends
    (t_start, content chunk times, completion tokens) to record."""
    body = {"model": server.model_name, "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": img_url}},
                {"type": "text", "text": QUESTION}]}]}
    t0 = time.perf_counter()
    times, tokens = [], None
    with requests.post(server.base + "/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    record.append((t0, times, tokens if tokens is not None else len(times)))


def single(server, img_url, max_tokens):
    """(time to first content chunk, decode tok/s from the first chunk to the last) of one streamed request."""
    rec = []
    stream(server, img_url, max_tokens, rec)
    t0, times, tokens = rec[0]
    rate = (tokens - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return times[0] - t0, rate


def concurrent(server, urls):
    record, threads = [], []
    t0 = time.perf_counter()
    for url in urls:
        th = threading.Thread(target=stream, args=(server, url, FORCED, record))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in record)
    ttfts = sorted(r[1][0] - r[0] for r in record)
    # Decode phase: from the last stream's first token to the first stream's end, every stream decoding.
    start, end = max(r[1][0] for r in record), min(r[1][-1] for r in record)
    in_window = sum(sum(start < t <= end for t in r[1]) * r[2] / len(r[1]) for r in record)
    # The decode step: the median gap between a stream's chunks inside the decode phase (outside it, gaps
    # include other streams' prefills); the whole stream's mean gap if the phase holds too few.
    gaps = [b - a for r in record for a, b in zip(r[1], r[1][1:]) if start <= a and b <= end]
    tpot = statistics.median(gaps) if len(gaps) >= STREAMS else \
        statistics.median((r[1][-1] - r[1][0]) / (len(r[1]) - 1) for r in record)
    return {"agg": tokens / wall, "decode": in_window / (end - start) if end > start else float("nan"),
            "ttft_p50": ttfts[len(ttfts) // 2], "ttft_p99": ttfts[-1], "tpot": tpot, "wall": wall}


def fmt_range(xs, unit="", digits=2):
    lo, hi = min(xs), max(xs)
    return f"{lo:.{digits}f}{unit}" if abs(hi - lo) < 10 ** -digits else f"{lo:.{digits}f}–{hi:.{digits}f}{unit}"


def run(args):
    model_dir = str(Path(args.model).resolve())
    config = json.loads((Path(model_dir) / "config.json").read_text())
    bw, read_kernel = read_bandwidth_gbs(args.threads)
    floor_tps = bw * 1e9 / decoder_f32_bytes(config)
    print(f"read bandwidth {bw:.1f} GB/s; decoder f32 weights {decoder_f32_bytes(config) / 1e9:.3f} GB "
          f"-> floor {floor_tps:.1f} tok/s", flush=True)
    if args.llama_cpp and not llama_cpp_peer.gguf_ready(args.gguf):
        raise SystemExit(f"no GGUF files in {args.gguf}: run `make-gguf --llama-cpp-src SRC` first")
    hf = Hf(model_dir, args.threads)
    servers = {"ours": Ours(args.server, model_dir, args.port, args.threads),
               # the opt-in f16-weight path, idle while the others run
               "ours f16": Ours(args.server, model_dir, args.port + 1, args.threads, ["--cpu-f16-weights"])}
    if args.llama_cpp:  # one slot each, so that no other slot's cached prompt widens its attention
        for i, (name, weights) in enumerate((("llama.cpp", "f32"), ("llama.cpp f16", "f16"))):
            servers[name] = llama_cpp_peer.LlamaCpp(args.llama_cpp, args.gguf, weights, args.port + 2 + i,
                                                    args.threads, 1, Path(args.gguf) / f"server-{weights}.log")
    peers = ["HF"] + (["llama.cpp"] if args.llama_cpp else [])
    rows = {k: {p: [] for p in peers + ["ours"]} for k in ("ttft", "vision", "decode")}
    f16 = {"ours": [], "llama.cpp": []}
    multi = {}
    try:
        seed = int(time.time())
        for rep in range(args.reps):
            img = new_image(seed + rep)
            ttft, vision, n_ids = hf.ttft(img)
            _, rate = hf.generate([new_image(seed + 1000 + rep)], FORCED)
            for key, value in (("ttft", ttft), ("vision", vision), ("decode", rate)):
                rows[key]["HF"].append(value)
            for i, name in enumerate(p for p in ("ours", "llama.cpp") if p in servers):
                server, base = servers[name], seed + 10000 * (i + 1) + 100 * rep
                if name == "ours":
                    enc0 = server.encode_seconds()
                    rows["ttft"][name].append(single(server, data_url(new_image(base)), 1)[0])
                    rows["vision"][name].append(server.encode_seconds() - enc0)
                else:
                    rows["ttft"][name].append(single(server, data_url(new_image(base)), 1)[0])
                    rows["vision"][name].append(server.vision_seconds(new_image(base), QUESTION))
                rows["decode"][name].append(single(server, data_url(new_image(base + 1)), FORCED)[1])
                f16[name].append(single(servers[name + " f16"], data_url(new_image(base + 2)), FORCED)[1])
            print(f"rep {rep}: prompt {n_ids} ids; " + "; ".join(
                f"{p} ttft {rows['ttft'][p][-1]:.2f} s, decode {rows['decode'][p][-1]:.1f} tok/s"
                for p in rows["ttft"]), flush=True)
        for name in [n for n in servers if n != "ours"]:
            servers.pop(name).close()
        multi["ours"] = (concurrent(servers["ours"], [data_url(new_image(seed + 4000))] * STREAMS),
                         concurrent(servers["ours"], [data_url(new_image(seed + 5000 + i)) for i in range(STREAMS)]))
        if args.llama_cpp:
            servers["llama.cpp"] = llama_cpp_peer.LlamaCpp(args.llama_cpp, args.gguf, "f32", args.port + 2,
                                                           args.threads, STREAMS, Path(args.gguf) / "server-16.log")
            multi["llama.cpp"] = (
                concurrent(servers["llama.cpp"], [data_url(new_image(seed + 8000))] * STREAMS),
                concurrent(servers["llama.cpp"], [data_url(new_image(seed + 9000 + i)) for i in range(STREAMS)]))
        hf_batch = None
        if not args.no_hf_batch:
            imgs = [new_image(seed + 6000 + i) for i in range(STREAMS)]
            first, _ = hf.generate(imgs, 1)
            total, rate = hf.generate(imgs, FORCED)
            hf_batch = {"agg": STREAMS * FORCED / total, "ttft": first, "decode": STREAMS * rate}
    finally:
        for server in servers.values():
            server.close()
    print_table(args, rows, f16, multi, hf_batch, floor_tps, bw, read_kernel)


def print_table(args, rows, f16, multi, hf_batch, floor_tps, bw, read_kernel):
    med = statistics.median
    peers = [p for p in rows["ttft"] if p != "ours"]
    lc = "llama.cpp" in peers
    print()
    head = [f"HF transformers {transformers.__version__} (torch {torch.__version__.split('+')[0]}, sdpa)"]
    if lc:
        head.append(f"llama.cpp ({llama_cpp_peer.describe(args.llama_cpp)}; f32 GGUF, its default f16 KV cache)")
    print(f"| figure ({args.reps} interleaved reps, cold images) | " + " | ".join(head) + " | ours | ours / faster peer |")
    print("|---" * (len(head) + 3) + "|")
    for key, label, unit, low in (("ttft", "cold TTFT", " s", True), ("vision", "vision + projector", " s", True),
                                  ("decode", "decode, one stream", " tok/s", False)):
        best = (min if low else max)(med(rows[key][p]) for p in peers)
        cells = [fmt_range(rows[key][p], unit) for p in peers + ["ours"]]
        print(f"| {label} | " + " | ".join(cells) + f" | {med(rows[key]['ours']) / best:.2f}× "
              f"({'lower' if low else 'higher'} is better) |")
    lc_f16 = [fmt_range(f16["llama.cpp"], " tok/s") + " (f16 GGUF)"] if lc else []
    ratio = (f"{med(f16['ours']) / med(f16['llama.cpp']):.2f}× llama.cpp f16" if lc else
             f"{med(f16['ours']) / med(rows['decode']['HF']):.2f}× HF f32")
    print("| decode, one stream, f16 weights (`--cpu-f16-weights`) | — | " + " | ".join(lc_f16) +
          f"{' | ' if lc else ''}{fmt_range(f16['ours'], ' tok/s')} | {ratio} |")
    for i, name in enumerate(("16 streams, one shared image", "16 streams, 16 different images")):
        cells = [(f"static batch: {hf_batch['agg']:.1f} tok/s (decode phase {hf_batch['decode']:.1f}, "
                  f"TTFT {hf_batch['ttft']:.1f} s)") if hf_batch and i == 1 else "—"]
        steps = ["—"]
        for p in (["llama.cpp"] if lc else []) + ["ours"]:
            r, one = multi[p][i], 1 / med(rows["decode"][p])
            cells.append(f"{r['agg']:.1f} tok/s (decode phase {r['decode']:.1f} tok/s; "
                         f"TTFT p50 {r['ttft_p50']:.1f} s, p99 {r['ttft_p99']:.1f} s)")
            steps.append(f"{r['tpot'] * 1e3:.0f} ms vs {one * 1e3:.0f} ms ({r['tpot'] / one:.1f}×)")
        print(f"| {name}, aggregate | " + " | ".join(cells) + " | |")
        print(f"| {name}: decode step at 16 vs 1 | " + " | ".join(steps) + " | |")
    print(f"| weight-read floor, one stream | — | " + ("— | " if lc else "") +
          f"{floor_tps:.1f} tok/s ({bw:.1f} GB/s read, {read_kernel}, {args.threads} threads); "
          f"ours at {med(rows['decode']['ours']) / floor_tps:.0%} of it | |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("make-mid")
    m.add_argument("--out", default=str(ROOT / "target" / "llava-mid"))
    r = sub.add_parser("run")
    r.add_argument("--model", default=str(ROOT / "target" / "llava-mid"))
    r.add_argument("--server", default=str(ROOT / "target" / "release" / "llava-server"))
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--port", type=int, default=18614)
    r.add_argument("--no-hf-batch", action="store_true")
    r.add_argument("--llama-cpp", help="a llama-server binary: llama.cpp runs as a third peer")
    g = sub.add_parser("make-gguf")
    g.add_argument("--llama-cpp-src", required=True, help="llama.cpp's source tree (its conversion scripts)")
    for q in (r, g):
        q.add_argument("--gguf", default=str(ROOT / "target" / "llava-mid-gguf"))
    g.add_argument("--model", default=str(ROOT / "target" / "llava-mid"))
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    if args.mode == "make-mid":
        make_mid(args)
    elif args.mode == "make-gguf":
        llama_cpp_peer.make_gguf(str(Path(args.model).resolve()), args.llama_cpp_src, args.gguf)
    else:
        run(args)


if __name__ == "__main__":
    main()
