"""Work that makes a GPU wait for the host, kept out of the hot paths, checked at the dispatch level.

- ``sdpa_varlen`` splits packed rows into traces; finding the traces from the position ids on the device
  (``nonzero``, then reading it to the host) stalls the GPU in every layer. ``final_hidden_states``
  works the split out once per forward on the host and the layers only slice. A dispatch mode counts the
  data-dependent ops (their output size or value must reach the host) run inside the decoder layers,
  forward and the checkpointed recompute in backward.
- The weight sync for the vLLM sampler casts the float32 masters to the engine's dtype on the trainer's
  device, then copies: the copy to the host moves half the bytes. The model here lives on the ``meta``
  device, standing in for the GPU (no data, real shapes and dtypes), and a dispatch mode performs each
  device-to-host copy, recording the dtype that crosses.
"""

from __future__ import annotations

import peft
import torch
from torch.utils import checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen3Config, Qwen3ForCausalLM

from opd_runtime import vllm_sampler
from opd_runtime.sft.packing import pack
from opd_runtime.training import activations, chunked

HOST_READS = {  # ops whose result the host must see: each is a device synchronisation on a GPU
    torch.ops.aten.nonzero.default,
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.masked_select.default,
}


def tiny_qwen3(layers: int = 3, device: str = "cpu"):
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    with torch.device(device):
        return Qwen3ForCausalLM(config).float()


class HostReadsInLayers(TorchDispatchMode):
    """Counts ``HOST_READS`` ops that run while a decoder layer computes (its forward or recompute)."""

    def __init__(self, layers):
        super().__init__()
        self.depth, self.count = 0, 0
        self._handles = []
        for layer in layers:
            self._handles.append(layer.register_forward_pre_hook(self._enter))
            self._handles.append(layer.register_forward_hook(self._leave))

    def _enter(self, *_):
        self.depth += 1

    def _leave(self, *_):
        self.depth -= 1

    def remove(self):
        for h in self._handles:
            h.remove()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.depth and func in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def traces():
    gen = torch.Generator().manual_seed(3)
    return [
        (torch.randint(3, 500, (p,), generator=gen).tolist(), torch.randint(3, 500, (c,), generator=gen).tolist())
        for p, c in ((5, 9), (7, 4), (3, 12))
    ]


def test_packed_training_pass_reads_nothing_back_to_the_host_inside_the_layers():
    model = tiny_qwen3()
    assert activations.use_fast_attention(model) == "sdpa_varlen"
    activations.use_gradient_checkpointing(model, True)
    model.train()
    rows = pack(traces(), None, pad_id=0)
    counter = HostReadsInLayers(model.model.layers)
    # the recompute runs each layer to its end (by default it stops once it has what backward needs, so
    # the layer's forward hook would not run)
    try:
        with counter, checkpoint.set_checkpoint_early_stop(False):
            hidden_BTD = chunked.final_hidden_states(model, rows.input_ids_BT, position_ids_BT=rows.position_ids_BT)
            hidden_BTD.square().sum().backward()
        assert counter.depth == 0
        assert counter.count == 0
        # right-padded rows (no position ids: transformers makes them) likewise
        with counter, checkpoint.set_checkpoint_early_stop(False):
            chunked.final_hidden_states(model, rows.input_ids_BT.repeat(2, 1)).sum().backward()
        assert counter.count == 0
    finally:
        counter.remove()
    # and the packed row still computes each trace on its own
    with torch.no_grad():
        packed_TD = chunked.final_hidden_states(model, rows.input_ids_BT, position_ids_BT=rows.position_ids_BT)[0]
        at = 0
        for prompt, completion in traces():
            ids = torch.tensor([prompt + completion])
            alone_TD = chunked.final_hidden_states(model, ids)[0]
            torch.testing.assert_close(packed_TD[at : at + ids.shape[1]], alone_TD, rtol=1e-5, atol=1e-5)
            at += ids.shape[1]


class HostCopies(TorchDispatchMode):
    """Performs each meta-to-CPU copy (an empty CPU tensor of the shape and dtype asked for), recording
    the dtype that crosses."""

    def __init__(self):
        super().__init__()
        self.crossing: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].is_meta and kwargs.get("device") == torch.device("cpu"):
            src = args[0]
            self.crossing.append(src.dtype)
            return torch.empty(src.shape, dtype=kwargs.get("dtype") or src.dtype, device="cpu")
        return func(*args, **kwargs)


def test_the_weight_sync_casts_on_the_device_before_copying_to_the_host():
    model = tiny_qwen3(layers=1, device="meta")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the masters
    with HostCopies() as copies:
        state = vllm_sampler.engine_weights(model, base_only=False, dtype=torch.bfloat16)
    assert state and all(v.device.type == "cpu" and v.dtype == torch.bfloat16 for v in state.values())
    assert copies.crossing and set(copies.crossing) == {torch.bfloat16}, copies.crossing


def test_the_lora_base_weights_cross_to_the_host_in_the_engine_dtype_too():
    model = peft.get_peft_model(tiny_qwen3(layers=1, device="meta"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with HostCopies() as copies:
        state = vllm_sampler.engine_weights(model, base_only=True, dtype=torch.bfloat16)
    assert state and not any("lora_" in k for k in state)
    assert copies.crossing and set(copies.crossing) == {torch.bfloat16}, copies.crossing
