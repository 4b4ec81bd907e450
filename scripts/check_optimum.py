"""Runs a reference-flavour version through optimum's ORTModelForCausalLM next to transformers.

optimum pins an older transformers, so run this in its own environment, not the project's:
  python3 -m venv /tmp/optenv && /tmp/optenv/bin/pip install torch==2.13.0 optimum-onnx onnxruntime
  /tmp/optenv/bin/python scripts/check_optimum.py VERSION_DIR HF_CHECKPOINT_DIR
It copies the version folder, adds the checkpoint's config.json (optimum reads the model type from
it) and compares 20 greedy tokens of both on a chat prompt.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import torch
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

version, checkpoint = Path(sys.argv[1]), Path(sys.argv[2])
work = Path(tempfile.mkdtemp()) / "version"
shutil.copytree(version, work)
for name in ("config.json", "generation_config.json"):
    if (checkpoint / name).exists():
        shutil.copy(checkpoint / name, work / name)
tok = AutoTokenizer.from_pretrained(work)
ort_model = ORTModelForCausalLM.from_pretrained(work, file_name="model.onnx", use_cache=True)
messages = [{"role": "user", "content": "What is the capital of France?"}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
ours = ort_model.generate(ids, max_new_tokens=20, do_sample=False)
ref = AutoModelForCausalLM.from_pretrained(checkpoint).generate(
    ids, max_new_tokens=20, do_sample=False
)
print("optimum:     ", repr(tok.decode(ours[0, ids.shape[1] :])))
print("transformers:", repr(tok.decode(ref[0, ids.shape[1] :])))
print("same tokens: ", ours.tolist() == ref.tolist())
sys.exit(0 if ours.tolist() == ref.tolist() else 1)
