"""What several tests share: a script of scripts/ loaded as a module (its ``main`` called
in-process, the command line's code path without a new interpreter), and the text of a
tiny run config over two JSON-lines domains, ``en`` then ``num``, with 25% replay."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = '''
import json
from cpt_jax.run_config import default_config


def get_config():
    c = default_config()
    c.model.update(dict(vocab_size={vocab_size}, d_model=32, n_layers=1, n_heads=4,
                        n_kv_heads=2, d_ff=64, max_seq_len=64))
    c.seq_len, c.global_batch = 16, 8
    c.data.domains = json.loads({domains!r})
    c.data.cache_dir = {cache!r}
    c.data.val_fraction = 0.2
    c.tasks = [{{"domain": "en", "steps": {steps}}}, {{"domain": "num", "steps": {steps}}}]
    c.eval.update(dict(every=0, max_rows=8, batch=8))
    c.optim.lr = 3e-3
    c.replay.rate = 0.25
    c.checkpoint.update(dict(every=2, keep={keep}, async_save=False))
    return c
'''


def load_script(name: str):
    """scripts/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_script",
                                                  os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_run_config(domains_json: str, cache: str, *, vocab_size: int, steps: int,
                    keep: int) -> str:
    """A config file's text: a 1-layer Llama over the domains (a JSON list), 16 x 8 batches,
    ``steps`` steps per task, a checkpoint every 2 steps, the last ``keep`` kept."""
    return _CONFIG.format(domains=domains_json, cache=cache, vocab_size=vocab_size,
                          steps=steps, keep=keep)


def demo_tokenizer(folder: str, vocab_size: int = 400):
    """A small BPE tokenizer trained on the demo's prose and code (offline text)."""
    from cpt_jax.data import tokenizer as tk

    domains = [{"kind": "demo", "demo": name, "max_chars": 20_000}
               for name in ("python_docs", "python_code")]
    return tk.train_tokenizer(domains, os.path.join(str(folder), "t"), vocab_size,
                              sample_chars=40_000)
