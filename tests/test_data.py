import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ssl_memory import MultiAugCollate, WithIndex


def jitter(x):
    """A random tensor transform (module level, so workers can unpickle it)."""
    return x + 0.01 * torch.randn_like(x)


def numpy_flip(x):
    """A numpy transform returning an array with negative strides."""
    return np.asarray(x)[::-1] + np.random.uniform(-0.01, 0.01, size=np.shape(x))


class ArrayDataset:
    """Items are plain numpy arrays, no label."""

    def __init__(self, n):
        self.data = np.arange(n * 3, dtype=np.float32).reshape(n, 3)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def test_with_index_shapes_items():
    x, y = torch.randn(5, 2), torch.arange(5) * 10
    labelled = WithIndex(TensorDataset(x, y))
    index, sample, label = labelled[3]
    assert index == 3 and torch.equal(sample, x[3]) and int(label) == 30 and len(labelled) == 5
    index, sample = WithIndex(TensorDataset(x))[2]
    assert index == 2 and torch.equal(sample, x[2])
    index, sample = WithIndex(ArrayDataset(4))[1]
    assert index == 1 and np.array_equal(sample, [3, 4, 5])
    with pytest.raises(ValueError, match="tuple of 3"):
        WithIndex(TensorDataset(x, y, y))[0]
    with pytest.raises(TypeError, match="map-style"):
        WithIndex(iter([1, 2]))


@pytest.mark.parametrize("views", [1, 3])
def test_collate_is_view_major_with_repeated_indices_and_labels(views):
    x, y = torch.randn(6, 4), torch.tensor([5, 1, 4, 1, 5, 9])
    data = WithIndex(TensorDataset(x, y))
    batch = MultiAugCollate(jitter, views=views)([data[i] for i in [4, 0, 2]])
    assert set(batch) == {"views", "indices", "labels"}
    assert batch["views"].shape == (3 * views, 4)
    assert batch["indices"].tolist() == [4, 0, 2] * views
    assert batch["labels"].tolist() == [5, 5, 4] * views
    for row, index in enumerate(batch["indices"].tolist()):
        assert torch.allclose(batch["views"][row], x[index], atol=0.1)
    if views > 1:
        assert not torch.equal(batch["views"][:3], batch["views"][3:6])  # views are separate draws


def test_collate_takes_numpy_items_and_transforms_without_labels():
    data = WithIndex(ArrayDataset(5))
    batch = MultiAugCollate(numpy_flip, views=2)([data[i] for i in [1, 3]])
    assert set(batch) == {"views", "indices"}
    assert batch["indices"].tolist() == [1, 3, 1, 3]
    expected = torch.tensor([[5.0, 4, 3], [11, 10, 9]]).repeat(2, 1)
    torch.testing.assert_close(batch["views"].float(), expected, atol=0.02, rtol=0)


def test_collate_with_a_real_dataloader_and_two_workers():
    n, views = 37, 2
    x, y = torch.randn(n, 8), torch.arange(n) % 5
    loader = DataLoader(
        WithIndex(TensorDataset(x, y)),
        batch_size=8,
        shuffle=True,
        num_workers=2,
        collate_fn=MultiAugCollate(jitter, views=views),
        generator=torch.Generator().manual_seed(0),
    )
    seen = []
    for batch in loader:
        b = batch["views"].shape[0] // views
        assert torch.equal(batch["indices"][:b], batch["indices"][b:])
        assert torch.equal(batch["labels"], y[batch["indices"]])
        assert torch.allclose(batch["views"], x[batch["indices"]], atol=0.1)
        seen += batch["indices"][:b].tolist()
    assert sorted(seen) == list(range(n))


def test_collate_pickles():
    collate = pickle.loads(pickle.dumps(MultiAugCollate(jitter, views=4)))
    assert collate.views == 4 and collate.transform is jitter


def test_collate_errors():
    with pytest.raises(TypeError, match="transform must be callable"):
        MultiAugCollate(None)
    with pytest.raises(ValueError, match="views must be a positive int"):
        MultiAugCollate(jitter, views=0)
    collate = MultiAugCollate(jitter)
    with pytest.raises(TypeError, match="wrap the dataset in WithIndex"):
        collate([(torch.randn(3), 1)] * 2 + [(torch.randn(3),)])
    with pytest.raises(TypeError, match="wrap the dataset in WithIndex"):
        collate([(torch.randn(3), torch.randn(3))])
    with pytest.raises(ValueError, match="all have labels or all have none"):
        collate([(0, torch.randn(3)), (1, torch.randn(3), 2)])
    with pytest.raises(ValueError, match="one shape"):
        collate([(0, torch.randn(3)), (1, torch.randn(4))])
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    with pytest.raises(TypeError, match="tensor or a numpy array"):
        MultiAugCollate(lambda x: object())([(0, torch.randn(3))])
