"""dszo.launcher: the launcher environment mapped (srun without a launcher, mpirun), Slurm node lists."""
from dszo import launcher


def test_slurm_env_is_mapped():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": "gpu[007-008]"}
    launcher.map_launcher_env(env)
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == "1"
    assert env["LOCAL_WORLD_SIZE"] == "4" and env["MASTER_ADDR"] == "gpu007" and env["MASTER_PORT"] == "29500"


def test_slurm_nodelist_expansion():
    assert launcher.expand_slurm_nodelist("n[01-03,07],login1") == ["n01", "n02", "n03", "n07", "login1"]


def test_open_mpi_env_is_mapped_and_launcher_env_wins():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "10.0.0.9"}
    launcher.map_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("1", "2", "1", "10.0.0.9")
    set_by_launcher = {"RANK": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}
    assert launcher.map_launcher_env(set_by_launcher) == {} and set_by_launcher["RANK"] == "0"


def test_a_single_process_without_launcher_takes_a_free_port_not_29500():
    a, b = {}, {}
    launcher.map_launcher_env(a)
    launcher.map_launcher_env(b)
    assert a["RANK"] == "0" and a["WORLD_SIZE"] == "1" and a["MASTER_ADDR"] == "127.0.0.1"
    assert a["MASTER_PORT"] != "29500" and a["MASTER_PORT"].isdigit()
    assert launcher.map_launcher_env({"MASTER_PORT": "1234"})["MASTER_PORT"] == "1234"   # a user's choice is kept
