"""What a result records about the machine it ran on."""

import json
import platform

import torch

from dedn.utils.machine import cpu_model, machine_info


def test_cpu_model_reads_the_model_name(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: avx2\n")
    assert cpu_model(info) == "AMD EPYC 7B13"


def test_cpu_model_falls_back_without_proc(tmp_path):
    expected = platform.processor() or platform.machine() or "unknown"
    assert cpu_model(tmp_path / "missing") == expected
    (tmp_path / "empty").write_text("processor\t: 0\nmodel name\t:\n")
    assert cpu_model(tmp_path / "empty") == expected


def test_machine_info_names_the_build_and_the_kernels():
    info = machine_info("cpu")
    assert info["torch"] == torch.__version__ and info["threads"] == torch.get_num_threads()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "gpu" not in info and json.loads(json.dumps(info)) == info
