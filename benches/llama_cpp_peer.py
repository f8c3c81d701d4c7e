"""llama.cpp as the third peer of benches/cpu_side_by_side.py: GGUF conversion of the mid checkpoint and its server.

llama.cpp's source tree ships inside PyPI's `llama-cpp-python` sdist (vendor/llama.cpp). Build its server with
  cmake -S vendor/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF && ninja -C build llama-server
(`pip install cmake ninja` gives both tools). The conversion runs llama.cpp's own scripts from that tree:
  - the decoder: the checkpoint's language model saved as a LlamaForCausalLM folder, then `convert_hf_to_gguf.py`
    (`--outtype f32` and `f16`);
  - the image encoder: llama.cpp reads llava-1.5's CLIP only through its legacy path: the vision tower saved as a
    CLIPVisionModel folder plus a `llava.projector` file, then `legacy-models/convert_image_encoder_to_gguf.py
    --clip-model-is-vision --use-f32`, which drops CLIP's last layer (vision layer -2) and keeps the patch
    embedding and the projector in f16 (the legacy writer always does).
That path is not exact (llama.cpp pads the image instead of centre-cropping it and places CLIP's class token
differently: its issues #25817 and #25814), so llama.cpp is a speed peer here, never a reference for outputs.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch
import transformers
from safetensors.torch import save_file



def make_gguf(model_dir, src, out):
    """Writes out/text-f32.gguf, out/text-f16.gguf and out/mmproj-f32.gguf from the llava-hf folder model_dir."""
    src, out = Path(src), Path(out)
    work = out / "hf"
    shutil.rmtree(out, ignore_errors=True)
    (work / "llm").mkdir(parents=True)
    (work / "vit").mkdir()
    model = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = transformers.LlamaForCausalLM(model.config.text_config)
    state = {"model." + k: v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    llm.load_state_dict(state, strict=True)
    llm.save_pretrained(str(work / "llm"))
    # llama.cpp wants one vocabulary entry per embedding row: llava-hf's tokenizer has 32002 of the 32064.
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    rows = model.config.text_config.vocab_size
    tokenizer.add_tokens([f"<unused_{i}>" for i in range(rows - len(tokenizer))])
    tokenizer.save_pretrained(str(work / "llm"))
    # The legacy script loads CLIPVisionModel with the transformers it pins (4.x), whose names start with
    # `vision_model.`; transformers 5 saves them without that prefix.
    model.config.vision_config.save_pretrained(str(work / "vit"))
    save_file({"vision_model." + k: v.contiguous() for k, v in model.model.vision_tower.state_dict().items()},
              str(work / "vit" / "model.safetensors"))
    torch.save(model.model.multi_modal_projector.state_dict(prefix="multi_modal_projector."),
               work / "vit" / "llava.projector")
    env = {"PYTHONPATH": str(src / "gguf-py")}
    for outtype in ("f32", "f16"):
        run([sys.executable, src / "convert_hf_to_gguf.py", work / "llm", "--outtype", outtype,
             "--outfile", out / f"text-{outtype}.gguf"], env)
    env["PYTHONPATH"] = f"{legacy_transformers(src, work / 'site')}:{env['PYTHONPATH']}"
    run([sys.executable, src / "tools" / "mtmd" / "legacy-models" / "convert_image_encoder_to_gguf.py",
         "-m", work / "vit", "--llava-projector", work / "vit" / "llava.projector", "--output-dir", out,
         "--clip-model-is-vision", "--use-f32"], env)
    (out / "mmproj-model-f32.gguf").rename(out / "mmproj-f32.gguf")
    shutil.rmtree(work)
    print(f"wrote {out}: text-f32.gguf, text-f16.gguf, mmproj-f32.gguf")


def legacy_transformers(src, site):
    """Installs the transformers that llama.cpp pins for its legacy conversion into site (torch and the rest
    come from this environment) and returns site."""
    pins = (src / "requirements" / "requirements-convert_legacy_llama.txt").read_text()
    transformers_pin = re.search(r"^transformers==\S+", pins, re.M).group(0)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    transformers_pin, "huggingface_hub<1.0", "tokenizers<0.23"], check=True)
    return site


def run(cmd, env):
    subprocess.run([str(c) for c in cmd], check=True, env=dict(os.environ, **env), stdout=subprocess.DEVNULL)


class LlamaCpp:
    """llama-server on the GGUF pair, spoken to through the same OpenAI chat API as ours. Its server logs no image
    encode time, so the vision time comes from `llama-mtmd-cli` (built beside it) on the same image: its
    "mtmd batch encoding done in N ms"."""

    def __init__(self, binary, gguf_dir, weights, port, threads, parallel, log_path):
        self.base = f"http://127.0.0.1:{port}"
        self.model_name = "mid"  # llama-server serves one model and ignores the name
        self.binary, self.threads = Path(binary), threads
        self.text = Path(gguf_dir) / f"text-{weights}.gguf"
        self.mmproj = Path(gguf_dir) / "mmproj-f32.gguf"
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "w")
        slot_ctx = 1024
        # No --chat-template: the GGUF has none, and llama-server's fallback places the image marker itself
        # (its legacy `vicuna` template does not, and rejects image requests).
        self.proc = subprocess.Popen(
            [str(binary), "-m", str(self.text), "--mmproj", str(self.mmproj), "--port", str(port),
             "-t", str(threads), "-tb", str(threads), "--parallel", str(parallel), "-c", str(slot_ctx * parallel)],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_until_healthy(self.base, self.proc, f"llama-server (log: {self.log_path})")

    def close(self):
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()

    def vision_seconds(self, image, question):
        """llama.cpp's image encode time (CLIP + projector) for image (a PIL image), from llama-mtmd-cli."""
        with tempfile.NamedTemporaryFile(suffix=".png") as f:
            image.save(f.name)
            out = subprocess.run(
                [str(self.binary.parent / "llama-mtmd-cli"), "-m", str(self.text), "--mmproj", str(self.mmproj),
                 "--image", f.name, "-p", question, "-n", "1", "-t", str(self.threads),
                 "--chat-template", "vicuna"], capture_output=True, text=True, timeout=600)
        found = re.findall(r"encoding done in (\d+) ms", out.stdout + out.stderr)
        if not found:
            raise RuntimeError("llama-mtmd-cli printed no encode time:\n" + (out.stdout + out.stderr)[-2000:])
        return int(found[-1]) / 1e3


def wait_until_healthy(base, proc, name):
    """Polls base/health (ours and llama-server both answer 200 when ready) for up to five minutes."""
    for _ in range(600):
        try:
            if requests.get(base + "/health", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited")
        time.sleep(0.5)
    raise RuntimeError(f"{name} did not become healthy")


def describe(binary):
    """llama.cpp's version line, for the results table."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "llama.cpp"


def gguf_ready(gguf_dir):
    return all((Path(gguf_dir) / f).exists() for f in ("text-f32.gguf", "text-f16.gguf", "mmproj-f32.gguf"))

