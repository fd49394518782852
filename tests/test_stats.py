import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emolens.stats import RunningCovariance, RunningMean, principal_components, project_out


def test_running_mean_merge_equals_single_pass():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(100, 3, 8, generator=g)
    labels = torch.randint(0, 5, (100,), generator=g)
    whole = RunningMean(5, (3, 8))
    whole.update(labels, values)
    a, b = RunningMean(5, (3, 8)), RunningMean(5, (3, 8))
    a.update(labels[:37], values[:37])
    b.update(labels[37:], values[37:])
    merged = a.merge(b)
    assert torch.allclose(merged.mean(), whole.mean(), atol=1e-12, rtol=0)
    for k in range(5):
        assert torch.allclose(whole.mean()[k], values[labels == k].double().mean(0), atol=1e-12)
    restored = RunningMean.from_state(whole.state_dict())
    assert torch.equal(restored.mean(), whole.mean())


def test_running_covariance_merge_equals_single_pass_and_numpy():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(300, 6, generator=g) * torch.arange(1, 7) + 3
    whole = RunningCovariance(1, 6)
    whole.update(0, rows)
    parts = RunningCovariance(1, 6)
    for chunk in rows.split(70):
        shard = RunningCovariance(1, 6)
        shard.update(0, chunk)
        parts.merge(shard)
    expected = torch.cov(rows.double().T, correction=0)
    assert torch.allclose(whole.covariance()[0], expected, atol=1e-10)
    assert torch.allclose(parts.covariance()[0], whole.covariance()[0], atol=1e-12)


def test_component_count_is_exact_at_the_threshold():
    cov = torch.diag(torch.tensor([5.0, 3.0, 1.0, 1.0], dtype=torch.float64))  # ratios .5 .3 .1 .1
    assert principal_components(cov, 0.5)[0].shape[0] == 1
    assert principal_components(cov, 0.5000001)[0].shape[0] == 2
    assert principal_components(cov, 0.8)[0].shape[0] == 2
    assert principal_components(cov, 0.81)[0].shape[0] == 3
    assert principal_components(cov, 0.0)[0].shape[0] == 0


def test_planted_neutral_direction_is_removed_and_emotions_survive():
    g = torch.Generator().manual_seed(2)
    d = 16
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].T
    noise_dir, emotion_dirs = basis[0], basis[1:4]
    neutral = torch.randn(2000, 1, generator=g, dtype=torch.float64) * 10 * noise_dir
    neutral += 0.1 * torch.randn(2000, d, generator=g, dtype=torch.float64)
    stats = RunningCovariance(1, d)
    stats.update(0, neutral)
    components, ratio = principal_components(stats.covariance()[0], 0.5)
    assert components.shape[0] == 1 and ratio[0] > 0.9
    vectors = emotion_dirs + 2 * noise_dir  # emotion vectors contaminated by the neutral direction
    cleaned = project_out(vectors, components)
    assert torch.allclose(cleaned @ noise_dir, torch.zeros(3, dtype=torch.float64), atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(cleaned, emotion_dirs, dim=1)
    assert (cos > 0.999).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 12), st.integers(0, 5), st.integers(0, 10_000))
def test_project_out_is_idempotent_and_orthogonal(d, k, seed):
    k = min(k, d)
    g = torch.Generator().manual_seed(seed)
    components = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].T[:k]
    vectors = torch.randn(7, d, generator=g, dtype=torch.float64)
    once = project_out(vectors, components)
    assert torch.allclose(project_out(once, components), once, atol=1e-10)
    assert torch.allclose(once @ components.T, torch.zeros(7, k, dtype=torch.float64), atol=1e-10)
