"""Load models by hub id from a Hugging Face cache built by the test, offline, in a fresh
process (huggingface_hub reads HF_HOME at import). Prints one JSON line per case.

Usage: HF_HOME=<dir> HF_HUB_OFFLINE=1 python tests/_hub_cache_models.py
"""

from __future__ import annotations

import json

from peftlab.errors import ModelError
from peftlab.models import ModelSpec, load_model, load_tokenizer

CASES = [
    ("unknown-id", {"pretrained": "nobody/no-such-model"}),
    ("pickle-only", {"pretrained": "someone/pickled-minilm"}),
    ("pickle-only-allowed", {"pretrained": "someone/pickled-minilm", "allow_pickle": True}),
    ("remote-code", {"pretrained": "someone/custom-minilm"}),
    ("remote-code-trusted", {"pretrained": "someone/custom-minilm", "trust_remote_code": True}),
]

for name, entry in CASES:
    spec = ModelSpec.from_config(name, entry)
    try:
        load_tokenizer(spec)
        model = load_model(spec, 2, "single_label_classification", seed=0)
        out = {"case": name, "loaded": type(model).__name__}
    except ModelError as exc:
        out = {"case": name, "error": str(exc)}
    print(json.dumps(out), flush=True)
