"""Train or sample only a decoder's top k layers, over the cached output of the frozen layers below.

Used by CRM's peers (workers/peer_review.py) and UPO's estimator (workers/reward_model.py). The
layers below the top k are frozen, so their output for a fixed set of sequences is the same at
every step and every stochastic pass: it is computed once (eval mode, no dropout) and cached, and
every later pass runs the top k layers alone. On a 2-core CPU that is what turns a filter's half
hour into minutes (a full forward of SmolLM2-135M over 64 pairs is ~100 s on one loaded core).

The cached path swaps the decoder's ``layers`` list for its top k and feeds the cached states as
``inputs_embeds``: right for decoders that use their inputs as they are (Llama, SmolLM2, Qwen2,
Mistral); a model that scales its embeddings inside ``forward`` (Gemma) needs ``train_layers: null``.
Sequences are right-padded, so a causal model's states at real tokens do not depend on the pads.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from workers.cores import length_batches, pad_right


def check_train_layers(k: Any, key: str) -> int | None:
    """``k`` as an int >= 1, or None (full fine-tune); a ValueError naming ``key`` otherwise."""
    if k is None:
        return None
    if isinstance(k, bool) or not float(k).is_integer() or int(k) < 1:
        raise ValueError(f"{key}={k!r} must be a whole number >= 1 or null (full fine-tune)")
    return int(k)


class Trunk:
    """A model's decoder over a fixed list of token-id sequences, named by index.

    ``train_layers`` (k): only the top k decoder layers, the final norm and ``heads`` keep
    ``requires_grad``; the rest is frozen and its output cached for every sequence. ``None`` (or
    k >= the model's layers): nothing is frozen or cached, and ``hidden`` runs the whole model.
    """

    def __init__(self, model: Any, ids: list[list[int]], pad_id: int, train_layers: int | None, heads: list[Any], batch_size: int):
        self.model = model
        self.decoder = model.base_model
        self.all_layers = self.decoder.layers
        self.ids = ids
        self.pad_id = int(pad_id)
        self.last = [max((i for i, t in enumerate(seq) if t != self.pad_id), default=0) for seq in ids]
        self.features: list[Any] | None = None
        self.partial = train_layers is not None and int(train_layers) < len(self.all_layers)
        if self.partial:
            self._freeze_below(len(self.all_layers) - int(train_layers), heads, batch_size)

    def _freeze_below(self, first: int, heads: list[Any], batch_size: int) -> None:
        """Freeze layers ``< first`` and the embeddings; cache their output for every sequence."""
        import torch

        for p in self.model.parameters():
            p.requires_grad_(False)
        for module in [*self.all_layers[first:], self.decoder.norm, *heads]:
            for p in module.parameters():
                p.requires_grad_(True)
        captured: list[Any] = []
        # With only the frozen layers in place, the final norm's input is the first trainable layer's input.
        hook = self.decoder.norm.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        self.decoder.layers = self.all_layers[:first]
        was_training = self.model.training
        self.model.eval()
        features: list[Any] = [None] * len(self.ids)
        try:
            with torch.no_grad():
                for seqs in length_batches(self.ids, batch_size):
                    ids, mask = self.padded(seqs)
                    self.decoder(input_ids=ids, attention_mask=mask, use_cache=False)
                    states = captured.pop()
                    for row, j in enumerate(seqs):
                        features[j] = states[row, : len(self.ids[j])].clone()
        finally:
            hook.remove()
            self.model.train(was_training)
        self.features = features
        self.decoder.layers = self.all_layers[first:]

    def padded(self, seqs: list[int]) -> tuple[Any, Any]:
        """(input ids, attention mask) of sequences ``seqs``, right-padded, on the model's device."""
        ids, mask = pad_right([self.ids[j] for j in seqs], self.pad_id)
        device = self.model.device
        return ids.to(device), mask.to(device)

    def hidden(self, seqs: list[int]) -> Any:
        """The decoder's last hidden states (after its norm) for sequences ``seqs``, right-padded."""
        import torch

        ids, mask = self.padded(seqs)
        if not self.partial:
            return self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        states = torch.zeros((len(seqs), ids.shape[1], self.features[0].shape[-1]), dtype=self.features[0].dtype, device=ids.device)
        for row, j in enumerate(seqs):
            states[row, : len(self.ids[j])] = self.features[j]
        return self.decoder(inputs_embeds=states, attention_mask=mask, use_cache=False).last_hidden_state

    def last_token(self, seqs: list[int], hidden: Any) -> Any:
        """Each sequence's state at its rightmost non-pad token, where transformers' sequence classifiers read."""
        import torch

        last = torch.tensor([self.last[j] for j in seqs], device=hidden.device)
        return hidden[torch.arange(len(seqs), device=hidden.device), last]

    def release(self) -> None:
        """Put every layer back for good and drop the cache (the model is whole again, its weights as trained)."""
        self.decoder.layers = self.all_layers
        self.partial, self.features = False, None

    @contextmanager
    def whole(self) -> Iterator[Any]:
        """The model with all its layers in place (to save it, or to run it on other sequences)."""
        partial_layers = self.decoder.layers
        self.decoder.layers = self.all_layers
        try:
            yield self.model
        finally:
            self.decoder.layers = partial_layers
