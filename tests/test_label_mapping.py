import torch

from vpns_core.label_mapping import LabelMap, frequency_label_mapping


def test_flm_greedy_one_to_one():
    # target 0 mostly predicted as source 5, target 1 as source 5 too (less often) then 2
    pred = torch.tensor([5, 5, 5, 5, 2, 5, 2, 2, 7, 7])
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    mapping = frequency_label_mapping(pred, target, num_source=10, num_target=3)
    assert mapping.tolist() == [5, 2, 7]


def test_flm_distinct_even_when_all_same():
    mapping = frequency_label_mapping(torch.zeros(30, dtype=torch.long), torch.arange(30) % 3, 10, 3)
    assert len(set(mapping.tolist())) == 3


def test_label_map_selects_columns():
    lm = LabelMap(3)
    lm.mapping.copy_(torch.tensor([4, 0, 2]))
    logits = torch.arange(10.0).repeat(2, 1)
    assert lm(logits).tolist() == [[4.0, 0.0, 2.0]] * 2
    assert torch.equal(LabelMap(3, identity=True)(logits), logits)
