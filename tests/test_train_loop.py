"""TrainLoop's arithmetic, without a model: how an epoch is sized for small data sets."""

from __future__ import annotations

import pytest

from diffswap_igfi.training.loop import epoch_repeats


@pytest.mark.parametrize("samples,processes,batch,accumulation,expected", [
    (9, 1, 4, 1, 1),     # two full batches: no repeats
    (9, 2, 4, 1, 1),     # 8 samples per step, 9 in the set
    (9, 2, 8, 1, 2),     # 16 per step
    (6, 2, 4, 1, 2),     # the six photos on two processes
    (3, 2, 4, 1, 3),
    (9, 1, 4, 4, 2),     # accumulation needs more batches than an epoch has
    (9, 8, 4, 1, 4),
    (1, 1, 1, 1, 1),
])
def test_every_process_gets_a_full_accumulation_cycle_per_epoch(samples, processes, batch,
                                                                 accumulation, expected):
    repeats = epoch_repeats(samples, processes, batch, accumulation)
    assert repeats == expected
    # what the sharded, drop_last loader then gives each process
    per_process = (samples * repeats // batch) // processes
    assert per_process >= accumulation
