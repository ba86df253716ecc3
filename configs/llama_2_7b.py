"""Shape of Llama-2-7B: 32 layers, d 4096, 32 heads, ffn 11008. Needs fsdp sharding to train."""

from cpt_jax.run_config import default_config


def get_config():
    c = default_config()
    c.model.update(dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008, norm_eps=1e-5, max_seq_len=4096))
    c.seq_len = 4096
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.model.remat = "full"
    c.model.dtype = "bfloat16"
    return c
