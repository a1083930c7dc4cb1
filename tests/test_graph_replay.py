"""tests/graph_replay.py's stand-ins for CUDA graphs fail where a real capture or replay would."""

import pytest
import torch

from graph_replay import HostReadDuringCapture, emulated_cuda_graphs


def test_a_replay_redoes_the_recorded_device_work_and_none_of_the_python(monkeypatch):
    counter, scale = torch.zeros(1), torch.full((4,), 2.0)
    baked = {"offset": 1.0}
    with emulated_cuda_graphs(monkeypatch):
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            counter.add_(1)  # device work on fixed memory: redone on each replay
            out = (counter * scale).to(torch.float64) + baked["offset"]  # `to` makes a new tensor here
        assert counter.item() == 0  # a capture runs nothing
        baked["offset"] = 100.0  # host state read at capture stays as it was then
        for replays in (1, 2, 3):
            graph.replay()
            assert counter.item() == replays
            assert out.tolist() == [2.0 * replays + 1.0] * 4


@pytest.mark.parametrize("read", [lambda t: t[0].item(), lambda t: t.tolist(), lambda t: bool(t.sum() > 0),
                                  lambda t: t.nonzero()], ids=["item", "tolist", "bool", "nonzero"])
def test_a_host_read_while_capturing_fails_as_on_a_gpu(monkeypatch, read):
    values = torch.ones(3)
    with emulated_cuda_graphs(monkeypatch):
        read(values)  # outside a capture: allowed
        with pytest.raises(HostReadDuringCapture), torch.cuda.graph(torch.cuda.CUDAGraph()):
            read(values)


def test_allowed_host_reads_are_named_by_function(monkeypatch):
    def checked_on_the_cpu_only(t):
        return int(t.max())

    with emulated_cuda_graphs(monkeypatch, allowed_host_reads={"checked_on_the_cpu_only"}):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            assert checked_on_the_cpu_only(torch.arange(3)) == 2
