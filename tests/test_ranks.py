"""Which process this is, from the launcher's environment (torchrun or SLURM)."""

from mdlm_dmmd import ranks


def test_local_rank_from_torchrun_or_slurm(monkeypatch):
    assert ranks.local_rank() == 0  # conftest clears LOCAL_RANK and SLURM_LOCALID
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert ranks.local_rank() == 3
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's wins (torchrun inside an srun allocation)
    assert ranks.local_rank() == 1


def test_each_launched_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ranks.local_device("cuda") == "cuda"  # one process: torch's current device
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert ranks.local_device("cuda") == "cuda:2"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ranks.local_device("cuda") == "cuda:1"
    assert ranks.local_device("cpu") == "cpu"
    assert ranks.local_device("cuda:3") == "cuda:3"  # a device the user named is kept
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU visible per process: it is cuda:0
    assert ranks.local_device("cuda") == "cuda:0"


def test_each_process_draws_every_world_th_batch():
    """Process 1 of 2 draws batches 1 and 3 of 5; process 0 draws 0, 2, 4; together each once."""
    from mdlm_dmmd.ranks import Ranks

    assert list(Ranks(1, 2).mine(5)) == [1, 3] and list(Ranks(0, 2).mine(5)) == [0, 2, 4]
    assert list(Ranks().mine(3)) == [0, 1, 2]


def test_rank_0_writes_and_gathers_every_process_pieces(monkeypatch):
    """Two processes (the collectives stood in for): rank 0 alone writes and gets both shares;
    counts are summed over the processes."""
    import torch

    from mdlm_dmmd.ranks import Ranks

    assert Ranks().writer and Ranks(0, 2).writer and not Ranks(1, 2).writer
    other = {1: torch.tensor([1]), 3: torch.tensor([3])}

    def gather_object(obj, object_gather_list=None, dst=0):
        if object_gather_list is not None:
            object_gather_list[:] = [obj, other]

    monkeypatch.setattr(torch.distributed, "gather_object", gather_object)
    merged = Ranks(0, 2).gather({0: torch.tensor([0]), 2: torch.tensor([2])})
    assert {index: piece.tolist() for index, piece in merged.items()} == {0: [0], 1: [1], 2: [2], 3: [3]}
    assert Ranks(1, 2).gather(other) == {}
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, value: out.__setitem__(slice(None), [value, 5]))
    assert Ranks(0, 2).total(2) == 7


def test_an_empty_world_size_is_one_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "")
    assert ranks.launched() == 1
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert ranks.launched() == 3
