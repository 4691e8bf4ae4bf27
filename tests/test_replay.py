"""Chunk sampling semantics of the replay (QC_SPEC "Batches") at episode boundaries and the end."""

import numpy as np
import pytest
import torch

from qc_robot.data.replay import ChunkReplay

GAMMA = 0.5  # a discount whose powers are exact in binary, so expectations are exact


def _episodes(lengths: list[int], terminated_last: list[bool]) -> dict[str, np.ndarray]:
    """Flat rows for episodes of given lengths; obs value = global row index, reward = row + 1."""
    rows = sum(lengths)
    obs = np.arange(rows, dtype=np.float32)[:, None].repeat(2, axis=1)
    terminals = np.zeros(rows, np.float32)
    masks = np.ones(rows, np.float32)
    end = 0
    for n, term in zip(lengths, terminated_last, strict=True):
        end += n
        terminals[end - 1] = 1.0
        if term:
            masks[end - 1] = 0.0
    return {
        "observations": obs,
        "actions": np.arange(rows, dtype=np.float32)[:, None] * np.ones((1, 1), np.float32),
        "rewards": np.arange(1, rows + 1, dtype=np.float32),
        "terminals": terminals,
        "masks": masks,
        "next_observations": obs + 100.0,
    }


def _replay(lengths, terminated_last, capacity=100):
    r = ChunkReplay(obs_dim=2, act_dim=1, capacity=capacity)
    r.add_offline(_episodes(lengths, terminated_last))
    return r


def test_chunk_inside_one_episode():
    r = _replay([6], [False])
    b = r.gather(torch.tensor([1]), horizon=3, discount=GAMMA)
    # rows 1, 2, 3 with rewards 2, 3, 4
    np.testing.assert_allclose(b.rewards[0].numpy(), [2.0, 2.0 + 0.5 * 3, 2.0 + 0.5 * 3 + 0.25 * 4])
    np.testing.assert_array_equal(b.masks[0].numpy(), [1, 1, 1])
    np.testing.assert_array_equal(b.terminals[0].numpy(), [0, 0, 0])
    np.testing.assert_array_equal(b.valid[0].numpy(), [1, 1, 1])
    np.testing.assert_array_equal(b.actions[0, :, 0].numpy(), [1, 2, 3])
    assert b.observations[0, 0].item() == 1.0
    assert b.next_observations[0, 0].item() == 103.0  # next obs of the last step (row 3)


def test_chunk_crossing_a_time_limit_end():
    # episode 0 = rows 0..3 (truncated, not terminated), episode 1 = rows 4..7
    r = _replay([4, 4], [False, False])
    b = r.gather(torch.tensor([2]), horizon=4, discount=GAMMA)
    np.testing.assert_array_equal(b.terminals[0].numpy(), [0, 1, 1, 1])
    np.testing.assert_array_equal(b.valid[0].numpy(), [1, 1, 0, 0])
    np.testing.assert_array_equal(b.masks[0].numpy(), [1, 1, 1, 1])  # time limit: still bootstraps
    # rewards of rows 2, 3 only (rows 4, 5 belong to the next episode)
    np.testing.assert_allclose(b.rewards[0].numpy(), [3.0, 3.0 + 0.5 * 4] * 1 + [3.0 + 0.5 * 4] * 2)


def test_chunk_crossing_a_true_termination():
    r = _replay([3, 5], [True, False])
    b = r.gather(torch.tensor([1]), horizon=3, discount=GAMMA)
    np.testing.assert_array_equal(b.masks[0].numpy(), [1, 0, 0])
    np.testing.assert_array_equal(b.terminals[0].numpy(), [0, 1, 1])
    np.testing.assert_array_equal(b.valid[0].numpy(), [1, 1, 0])


def test_chunk_ending_exactly_at_episode_end_is_fully_valid():
    r = _replay([4, 4], [True, False])
    b = r.gather(torch.tensor([1]), horizon=3, discount=GAMMA)  # rows 1, 2, 3 (3 = terminal)
    np.testing.assert_array_equal(b.valid[0].numpy(), [1, 1, 1])
    np.testing.assert_array_equal(b.masks[0].numpy(), [1, 1, 0])
    assert b.next_observations[0, 0].item() == 103.0


def test_sampling_never_runs_past_the_stored_data():
    r = _replay([5, 5], [False, False])
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(50):
        b = r.sample(64, horizon=4, discount=GAMMA, generator=g)
        starts.update(b.observations[:, 0].int().tolist())
    assert starts == set(range(0, 7))  # 10 rows, h=4 → starts 0..6, all reachable


def test_too_little_data_is_a_clear_error():
    r = _replay([2], [False])
    with pytest.raises(ValueError, match="fewer than one chunk"):
        r.sample(4, horizon=3, discount=GAMMA)


def test_online_appends_keep_offline_data_when_full():
    r = _replay([4], [False], capacity=7)
    for i in range(10):
        r.add({"observations": [50.0 + i, 0.0], "actions": [0.0], "rewards": 0.0, "terminals": 0.0,
               "masks": 1.0, "next_observations": [0.0, 0.0]})
    obs = r.numpy()["observations"][:, 0]
    np.testing.assert_array_equal(obs[:4], [0, 1, 2, 3])  # offline rows untouched
    assert sorted(obs[4:].tolist()) == [57.0, 58.0, 59.0]  # the newest online rows


def test_missing_field_is_named():
    r = ChunkReplay(obs_dim=2, act_dim=1, capacity=10)
    data = _episodes([3], [False])
    del data["masks"]
    with pytest.raises(KeyError, match="masks"):
        r.add_offline(data)


def _online(values: list[float], terminal_last: bool = False) -> dict[str, np.ndarray]:
    n = len(values)
    obs = np.array(values, np.float32)[:, None].repeat(2, axis=1)
    terminals = np.zeros(n, np.float32)
    terminals[-1] = float(terminal_last)
    return {"observations": obs, "actions": np.zeros((n, 1), np.float32), "rewards": np.zeros(n, np.float32),
            "terminals": terminals, "masks": np.ones(n, np.float32), "next_observations": obs + 0.5}


def test_a_batch_crossing_capacity_fills_free_slots_before_overwriting():
    """Old bug: extend() of 5 rows into 2 free slots wrote all 5 from the ring start, leaving a
    zero row inside the sampled range and overwriting online rows while slots were free."""
    r = _replay([4], [False], capacity=10)
    r.extend(_online([50, 51, 52, 53]))  # rows 4..7, two slots left
    r.extend(_online([60, 61, 62, 63, 64]))  # 2 fill rows 8, 9; 3 overwrite the oldest online rows
    obs = r.numpy()["observations"][:, 0]
    np.testing.assert_array_equal(obs, [0, 1, 2, 3, 62, 63, 64, 53, 60, 61])
    assert r.size == 10 and r.cursor == 7  # next write replaces 53, the oldest row


def test_wrapped_ring_never_samples_across_the_newest_oldest_seam():
    r = _replay([4], [False], capacity=10)
    r.extend(_online([50, 51, 52, 53, 54, 55]))
    r.extend(_online([60, 61, 62]))  # storage: 0 1 2 3 | 60 61 62 53 54 55, newest = 62 (row 6)
    g = torch.Generator().manual_seed(0)
    b = r.sample(4000, 3, GAMMA, generator=g)
    starts = b.observations[:, 0]
    # A chunk from 61 or 62 would run into 53 (an older episode, no end flag between).
    assert not ((starts == 61) | (starts == 62)).any()
    allowed = {0.0, 1.0, 2.0, 3.0, 60.0, 53.0}  # start rows 0..7 minus rows 5, 6
    assert set(starts.unique().tolist()) == allowed
    counts = torch.stack([(starts == v).sum() for v in allowed]).float()
    assert counts.min() > 0.7 * counts.mean()  # still uniform over the allowed starts


def test_resume_restores_a_wrapped_ring_exactly():
    r = _replay([4], [False], capacity=10)
    for v in range(50, 59):
        r.add({k: v[0] for k, v in _online([float(v)]).items()})
    state = r.online_state()
    fresh = _replay([4], [False], capacity=10)
    fresh.load_online_state(state)
    np.testing.assert_array_equal(fresh.numpy()["observations"], r.numpy()["observations"])
    assert fresh.cursor == r.cursor != fresh.size  # the cursor survived (the ring had wrapped)
    for replay in (r, fresh):
        replay.add({k: v[0] for k, v in _online([99.0]).items()})
    np.testing.assert_array_equal(fresh.numpy()["observations"], r.numpy()["observations"])
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(r.sample(64, 3, GAMMA, g1).observations, fresh.sample(64, 3, GAMMA, g2).observations)
