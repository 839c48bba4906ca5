"""The distributed evaluation sampler: every image once, in the batch it has on one process."""

import pytest

from tea_lightning.data.labels import DataError
from tea_lightning.data.sampler import WholeBatchSampler


@pytest.mark.parametrize("size, batch, world", [(42, 16, 2), (10, 4, 2), (10, 4, 3), (5, 8, 2), (8, 4, 2), (9, 4, 4),
                                               (6, 4, 3), (4, 4, 4)])
def test_every_image_once_in_its_single_process_batch(size, batch, world):
    data = list(range(size))
    ranks = [list(WholeBatchSampler(data, batch, world, rank)) for rank in range(world)]
    # joined in rank order (as the metric gathers them) they are the single-process order: none repeated or missing
    assert [i for r in ranks for i in r] == data
    assert all(ranks)  # no rank without images
    # each batch a rank's loader makes holds images of one single-process batch, so they share its rectangular shape
    assert all(len({i // batch for i in r[k:k + batch]}) == 1 for r in ranks for k in range(0, len(r), batch))
    if size >= batch * world:  # whole single-process batches on every rank
        assert all(r[0] % batch == 0 for r in ranks) and all(len(r) % batch == 0 for r in ranks[:-1])


def test_fewer_images_than_processes_is_a_clear_error():
    with pytest.raises(DataError, match="3 evaluation images cannot be shared by 4 processes"):
        WholeBatchSampler(list(range(3)), 2, 4, 0)
