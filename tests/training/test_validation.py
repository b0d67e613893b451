"""validation.py: the labelled folder split into bank and queries, and the kNN monitor."""

import pytest
import torch
import torch.nn as nn

from byol_pytorch import BYOL
from byol_pytorch.training.validation import KnnMonitor, split_labelled


def _names(dataset, indices):
    return [dataset.paths[i].parent.name + "/" + dataset.paths[i].name for i in indices]


def test_split_holds_out_every_fifth_image_of_each_class(tmp_path, make_labelled):
    root = make_labelled(tmp_path / "lab", classes=3, per_class=7)
    bank, queries = split_labelled(str(root), 16, 3)
    assert len(bank) == 3 * 6 and len(queries) == 3  # image 5 of 7 per class is held out
    full = bank.dataset
    assert queries.dataset is full and not set(bank.indices) & set(queries.indices)
    files = {c: sorted(p.name for p in (root / f"class_{c}").iterdir()) for c in range(3)}
    assert _names(full, queries.indices) == [f"class_{c}/{files[c][4]}" for c in range(3)]
    image, label = queries[1]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 1
    again = split_labelled(str(root), 16, 3)
    assert again[0].indices == bank.indices and again[1].indices == queries.indices  # the same every time


def test_train_and_val_subfolders_are_used_as_given(tmp_path, make_labelled):
    make_labelled(tmp_path / "lab" / "train", classes=2, per_class=3)
    make_labelled(tmp_path / "lab" / "val", classes=2, per_class=2)
    bank, queries = split_labelled(str(tmp_path / "lab"), 8, 1)
    assert (len(bank), len(queries)) == (6, 4)
    assert bank.root.name == "train" and queries.root.name == "val"
    assert sorted(bank.targets) == [0, 0, 0, 1, 1, 1] and queries[0][0].shape == (1, 8, 8)
    (tmp_path / "lab" / "val").rename(tmp_path / "lab" / "test")  # test/ stands in for val/
    assert len(split_labelled(str(tmp_path / "lab"), 8, 1)[1]) == 4


def test_too_few_images_per_class_is_an_error(tmp_path, make_labelled):
    root = make_labelled(tmp_path / "lab", classes=2, per_class=4)
    with pytest.raises(ValueError, match="has too few images per class for a kNN check \\(at least 5 per class\\)"):
        split_labelled(str(root), 8, 3)


def _colour_learner():
    """A backbone whose embedding is the mean colour of the (normalised) image, rectified: it separates colours."""
    torch.manual_seed(0)
    pick = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        pick.weight.copy_(torch.eye(3)[:, :, None, None])
        pick.bias.zero_()
    net = nn.Sequential(pick, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    return BYOL(net, image_size=16, projection_size=8, projection_hidden_size=16)


def test_knn_monitor_scores_separable_colours_and_restores_modes(tmp_path, make_labelled):
    root = make_labelled(tmp_path / "lab", classes=3, per_class=10)
    monitor = KnnMonitor(str(root), 16, 3, torch.device("cpu"), batch_size=8)
    learner = _colour_learner()
    learner.train()
    learner.online_encoder.projector.eval()  # mixed modes, to be given back as they were
    modes = [m.training for m in learner.modules()]
    assert monitor(learner) == 1.0  # red, green and blue fall apart in the mean colour
    assert [m.training for m in learner.modules()] == modes

    bank, bank_labels, queries, query_labels = monitor.features(learner)
    assert bank.shape == (24, 3) and queries.shape == (6, 3) and query_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert monitor.num_classes == 3 and bank_labels.tolist() == [c for c in range(3) for _ in range(8)]
    # The reference: each query's nearest bank image by cosine similarity has the query's colour.
    sims = nn.functional.normalize(queries, dim=1) @ nn.functional.normalize(bank, dim=1).T
    assert torch.equal(bank_labels[sims.argmax(1)], query_labels)

    blind = _colour_learner()
    with torch.no_grad():
        blind.net[0].weight.zero_()  # every image embeds to the same point
    assert 0.0 <= monitor(blind) <= 0.5


def test_the_split_reads_a_folders_labels_once(tmp_path, make_labelled, monkeypatch):
    # LabelledImageFolder.targets builds a new list each time: one read per index was O(N^2).
    from byol_pytorch.data.folder import LabelledImageFolder

    reads = []
    original = LabelledImageFolder.targets.fget

    def counted(self):
        reads.append(1)
        return original(self)

    monkeypatch.setattr(LabelledImageFolder, "targets", property(counted))
    bank, queries = split_labelled(str(make_labelled(tmp_path / "lab", classes=3, per_class=10)), 8, 3)
    assert len(bank) == 24 and len(queries) == 6 and len(reads) == 1


def _rows_in(rows: torch.Tensor, others: torch.Tensor) -> int:
    return int((torch.cdist(rows, others) == 0).any(1).sum())


def test_unreadable_images_are_left_out_of_the_knn_not_replaced_by_copies(tmp_path, make_labelled):
    """Before: a broken held-out image was replaced by the next file, a bank image, and scored right by
    construction; a class whose files were all broken lent its places to copies of another class's."""
    learner = _colour_learner()
    intact = KnnMonitor(str(make_labelled(tmp_path / "intact")), 16, 3, torch.device("cpu"), batch_size=8)
    ref_bank, ref_bank_labels, ref_queries, _ = intact.features(learner)  # the reference: every file read
    root = make_labelled(tmp_path / "lab")  # the same images
    (root / "class_0" / "4.png").write_bytes(b"not a png")  # class 0's first held-out image
    for path in (root / "class_2").iterdir():
        path.write_bytes(b"")  # every file of class 2
    monitor = KnnMonitor(str(root), 16, 3, torch.device("cpu"), batch_size=8)
    bank, bank_labels, queries, query_labels = monitor.features(learner)
    assert monitor.unreadable == 11 and monitor.missing == ["class_2"]
    assert torch.equal(bank, ref_bank[:16]) and torch.equal(bank_labels, ref_bank_labels[:16])  # classes 0, 1
    assert torch.equal(queries, ref_queries[1:4]) and query_labels.tolist() == [0, 1, 1]  # 9.png of class 0, class 1
    assert _rows_in(queries, bank) == 0 and len(torch.unique(bank, dim=0)) == len(bank)  # no copies anywhere


def test_a_knn_whose_every_held_out_image_is_unreadable_is_a_value_error(tmp_path, make_labelled):
    root = make_labelled(tmp_path / "lab", classes=2, per_class=5)
    for c in range(2):
        (root / f"class_{c}" / "4.png").write_bytes(b"")
    monitor = KnnMonitor(str(root), 16, 3, torch.device("cpu"), batch_size=8)
    with pytest.raises(RuntimeError, match="none of the 2 held-out images of the kNN data could be read"):
        monitor.features(_colour_learner())


def test_a_cpu_knn_on_a_machine_with_cuda_pins_no_memory(tmp_path, make_labelled, monkeypatch):
    """Before: the monitor's loader pinned memory whenever CUDA existed, so eval --device cpu (and embed) on a GPU
    machine opened a CUDA context on GPU 0. CUDA is said to exist here; pinning without a GPU raises."""
    monitor = KnnMonitor(str(make_labelled(tmp_path / "lab", classes=3, per_class=10)), 16, 3, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert monitor(_colour_learner()) == 1.0
