"""Rank/world discovery from each launcher's environment (no processes started): torchrun,
deepspeed, accelerate, srun tasks, `srun torchrun` (torchrun wins), mpirun, and the errors
for missing or inconsistent variables."""
import pytest

from mmpretrain.distributed import LaunchError, _slurm_first_host, _slurm_tasks_on_node, discover, slurm_port

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node01", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "42"}
# what `srun --ntasks=4 --ntasks-per-node=2` gives task 3 (second node, second task)
SRUN = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_NODEID": "1",
        "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "12345",
        "SLURM_JOB_NODELIST": "gpu-[007-008]", "SLURM_STEP_NODELIST": "gpu-[007-008]"}


def test_no_launcher_is_one_process():
    info = discover({})
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "single")


def test_torchrun():
    info = discover(TORCHRUN)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (3, 1, 4, 2)
    assert (info.master_addr, info.master_port, info.launcher) == ("node01", 29400, "torchrun")
    assert not info.is_main


def test_deepspeed_launcher_env():
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "CROSS_RANK": "0",
           "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    info = discover(env)
    assert (info.rank, info.local_world_size, info.launcher) == (1, 2, "deepspeed")


def test_accelerate_env():
    env = dict(TORCHRUN, ACCELERATE_MIXED_PRECISION="no")
    assert discover(env).launcher == "accelerate"


def test_srun_one_task_per_gpu():
    info = discover(SRUN)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (3, 1, 4, 2)
    assert info.launcher == "slurm"
    assert info.master_addr == "gpu-007"  # first host of the step
    assert info.master_port == slurm_port(12345) == 20000 + 12345 % 20000


def test_srun_uses_exported_master_addr_and_port():
    info = discover(dict(SRUN, MASTER_ADDR="10.0.0.7", MASTER_PORT="31000"))
    assert (info.master_addr, info.master_port) == ("10.0.0.7", 31000)


def test_srun_torchrun_torchrun_wins():
    # srun starts one torchrun per node; its workers inherit SLURM_PROCID=node index etc.
    env = dict(SRUN, SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_NTASKS="2", SLURM_TASKS_PER_NODE="1(x2)")
    env.update(TORCHRUN)
    info = discover(env)
    assert (info.rank, info.local_rank, info.world_size, info.launcher) == (3, 1, 4, "torchrun")
    assert info.master_port == 29400


def test_srun_single_task_is_one_process_with_job_port():
    env = dict(SRUN, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="1", SLURM_NODEID="0",
               SLURM_TASKS_PER_NODE="1")
    info = discover(env)
    assert (info.rank, info.world_size, info.master_port) == (0, 1, slurm_port(12345))


def test_batch_script_without_srun_is_refused_when_tasks_gt_1():
    env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    env.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    with pytest.raises(LaunchError, match=r"SLURM_NTASKS=4 .*not an srun task.*SLURM_STEP_ID"):
        discover(env)
    env["SLURM_NTASKS"] = "1"
    assert discover(env).world_size == 1


def test_openmpi_and_mpich():
    ompi = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "h0", "MASTER_PORT": "29500"}
    info = discover(ompi)
    assert (info.rank, info.local_rank, info.world_size, info.launcher) == (5, 1, 8, "openmpi")
    pmi = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2",
           "MASTER_ADDR": "h0", "MASTER_PORT": "29500"}
    assert discover(pmi).launcher == "mpich"
    with pytest.raises(LaunchError, match="MASTER_ADDR and MASTER_PORT is not set"):
        discover({k: v for k, v in ompi.items() if not k.startswith("MASTER")})


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0"}, r"WORLD_SIZE is not set \(RANK, WORLD_SIZE and LOCAL_RANK"),
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, r"RANK is not set"),
        (dict(TORCHRUN, RANK="x"), r"RANK='x' is not an integer"),
        (dict(TORCHRUN, RANK="4"), r"RANK=4 is outside \[0, WORLD_SIZE=4\)"),
        (dict(TORCHRUN, LOCAL_RANK="2"), r"LOCAL_RANK=2 is outside \[0, LOCAL_WORLD_SIZE=2\)"),
        (dict(TORCHRUN, LOCAL_WORLD_SIZE="8"), r"LOCAL_WORLD_SIZE=8 must be in \[1, WORLD_SIZE=4\]"),
        (dict(TORCHRUN, WORLD_SIZE="0", RANK="0"), r"WORLD_SIZE=0 must be >= 1"),
        ({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, r"MASTER_ADDR is not set"),
        (dict(TORCHRUN, MASTER_PORT="http"), r"MASTER_PORT='http' is not an integer"),
        (dict(TORCHRUN, MASTER_PORT="70000"), r"MASTER_PORT=70000 is not a TCP port"),
        ({k: v for k, v in SRUN.items() if k != "SLURM_LOCALID"}, r"SLURM_LOCALID is not set"),
        ({k: v for k, v in SRUN.items() if k != "SLURM_NTASKS"}, r"SLURM_NTASKS is not set"),
        (dict(SRUN, SLURM_PROCID="4"), r"SLURM_PROCID=4 is outside \[0, SLURM_NTASKS=4\)"),
        (dict(SRUN, SLURM_LOCALID="2"), r"SLURM_LOCALID=2 is outside \[0, tasks on this node"),
        (dict(SRUN, SLURM_TASKS_PER_NODE="two"), r"SLURM_TASKS_PER_NODE='two' cannot be parsed"),
        (dict(SRUN, SLURM_NODEID="2"), r"SLURM_NODEID=2 is outside SLURM_TASKS_PER_NODE"),
        ({k: v for k, v in SRUN.items() if k != "SLURM_JOB_ID"}, r"SLURM_JOB_ID is not set and neither is MASTER_PORT"),
        ({k: v for k, v in SRUN.items() if "NODELIST" not in k}, r"MASTER_ADDR and SLURM_JOB_NODELIST are both unset"),
    ],
)
def test_missing_or_inconsistent_variables_name_the_variable(env, message):
    with pytest.raises(LaunchError, match=message):
        discover(env)


@pytest.mark.parametrize(
    "nodelist, first",
    [("vm", "vm"), ("node1,node2", "node1"), ("gpu-[007-009,012],x1", "gpu-007"),
     ("a[3,1-2]", "a3"), ("rack[1-2]-n[05-06]", "rack1-n05"), ("x-[10-11]-ib", "x-10-ib")],
)
def test_first_host_of_a_hostlist(nodelist, first):
    assert _slurm_first_host(nodelist) == first


def test_tasks_per_node():
    assert [_slurm_tasks_on_node("4(x2),2", i) for i in range(3)] == [4, 4, 2]
    assert _slurm_tasks_on_node("2", 0) == 2
