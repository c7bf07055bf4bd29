"""Per-row sampling: greedy rows, top-k/top-p filtering, per-request random streams."""

from __future__ import annotations

import pytest
import torch

from batching.errors import InvalidInputError
from batching.generation.sampling import SamplingParams, make_generator, sample_next_tokens


def draw(logits: torch.Tensor, params: list[SamplingParams]) -> list[int]:
    return sample_next_tokens(logits, params, [make_generator(p) for p in params])


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    assert draw(logits, [SamplingParams(4), SamplingParams(4)]) == [1, 0]


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 5e-324])  # the last one is subnormal
def test_a_temperature_too_small_to_divide_by_is_greedy(temperature: float) -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3)) * 30
    params = [SamplingParams(4, temperature=temperature, seed=i) for i in range(6)]
    assert all(p.greedy for p in params)
    assert draw(logits, params) == logits.argmax(-1).tolist()


def test_top_k_one_is_greedy_whatever_the_temperature() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(4, temperature=5.0, top_k=1, seed=i) for i in range(6)]
    assert draw(logits, params) == logits.argmax(-1).tolist()


def test_a_tiny_top_p_keeps_only_the_most_likely_token() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(4, temperature=1.0, top_p=1e-6, seed=i) for i in range(6)]
    assert draw(logits, params) == logits.argmax(-1).tolist()


def test_top_k_never_draws_outside_the_k_best() -> None:
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(2))
    allowed = set(logits[0].topk(3).indices.tolist())
    generator = torch.Generator().manual_seed(3)
    params = [SamplingParams(4, temperature=10.0, top_k=3)]
    drawn = {sample_next_tokens(logits, params, [generator])[0] for _ in range(200)}
    assert drawn <= allowed
    assert len(drawn) == 3


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    generator = torch.Generator().manual_seed(4)
    params = [SamplingParams(4, temperature=1.0, top_p=0.8)]
    drawn = {sample_next_tokens(probs.log(), params, [generator])[0] for _ in range(300)}
    assert drawn == {0, 1}


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    generator = torch.Generator().manual_seed(5)
    params = [SamplingParams(4, temperature=1.0)]
    counts = torch.zeros(3)
    for _ in range(2000):
        counts[sample_next_tokens(probs.log(), params, [generator])[0]] += 1
    assert torch.allclose(counts / counts.sum(), probs[0], atol=0.05)


def test_a_seeded_row_draws_the_same_whatever_its_neighbours() -> None:
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(6))
    seeded = SamplingParams(4, temperature=1.0, seed=1234)
    alone = draw(logits[2:3], [seeded])
    others = [SamplingParams(4, temperature=0.7, top_k=5), SamplingParams(4)]
    params = [others[0], others[1], seeded, others[0], others[1]]
    in_batch = draw(logits, params)
    assert in_batch[2] == alone[0]


@pytest.mark.parametrize(
    "bad",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": 4, "temperature": -1.0},
        {"max_new_tokens": 4, "top_p": 0.0},
        {"max_new_tokens": 4, "top_k": -1},
        {"max_new_tokens": 4, "stop": ("",)},
    ],
)
def test_invalid_sampling_params_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        SamplingParams(**bad)  # type: ignore[arg-type]
