"""The loader assembles exactly the sampler's rows into batch-sharded global arrays."""

import jax
import numpy as np

from cpt_jax import sharding as sharding_lib
from cpt_jax.data.loader import BatchLoader, eval_batches
from cpt_jax.replay.sampler import ReplaySampler


class FakeRows:
    """Rows whose tokens encode (domain, row) so any mix-up is visible."""

    def __init__(self, domain, n, row_len=5):
        self.domain, self.n, self.row_len = domain, n, row_len

    def __len__(self):
        return self.n

    def read(self, idx):
        idx = np.asarray(idx)
        tok = (self.domain * 1000 + idx)[:, None] + np.zeros((1, self.row_len), np.int64)
        return tok.astype(np.int32), np.ones_like(tok, np.int32)


def test_batches_hold_the_sampled_rows_sharded():
    mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sampler = ReplaySampler([40, 30], global_batch=8, rate=0.25, seed=3)
    loader = BatchLoader(sampler, [FakeRows(0, 40), FakeRows(1, 30)], mesh)
    for step, batch in enumerate(loader.iterate(1, 0, 3)):
        idx = sampler.batch(1, step)
        want = idx.domain * 1000 + idx.row
        np.testing.assert_array_equal(np.asarray(batch.arrays["tokens"])[:, 0], want)
        np.testing.assert_array_equal(batch.is_replay, idx.is_replay)
        assert batch.n_replay == 2 == idx.is_replay.sum()
        assert set(batch.arrays) == {"tokens", "segment_ids"}  # nothing unused on device
        tokens = batch.arrays["tokens"]
        assert tokens.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
        assert {s.data.shape for s in tokens.addressable_shards} == {(2, 5)}
    # the iterator starts anywhere: batch 2 alone equals the third iterated batch
    alone = next(iter(loader.iterate(1, 2, 3)))
    np.testing.assert_array_equal(np.asarray(alone.arrays["tokens"]), np.asarray(tokens))


def test_eval_batches_pad_with_segment_zero():
    mesh = sharding_lib.make_mesh({"data": 8})
    batches = eval_batches(FakeRows(2, 11), max_rows=100, batch=8, mesh=mesh)
    assert len(batches) == 2
    seg = np.asarray(batches[1]["segment_ids"])
    assert (seg[:3] == 1).all() and (seg[3:] == 0).all()
