"""From JSON requests to model batches and back: the part of serving that knows about models.

Two kinds, chosen by the recipe:
  - text: the recipe has the inference hook `generator(model)` returning a `TextGenerator` (the GPT
    recipe does). Request `{"prompt": "text"}` or `{"tokens": [ids]}`, optional `"max_new_tokens"`;
    answer `{"tokens": [...], "completion": "text"}` by greedy decoding.
  - tensor: any other recipe. Request `{"input": nested list}` shaped like one sample of the recipe's
    eval split; answer `{"output": [...]}` plus `"prediction"` (the argmax) for 1-D outputs.
`parse` checks a request and raises `RequestError` (an HTTP 4xx) for anything malformed or too long,
before it can reach a batch; `run_batch` answers a list of parsed requests in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from launcher.config.schema import ServeConfig


class RequestError(ValueError):
    """A request the server refuses: HTTP `status` with this message; other requests are unaffected."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class TextGenerator(Protocol):
    """What a recipe's `generator(model)` hook returns."""

    max_len: int
    """Prompt plus generated tokens must fit in this many positions."""
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, tokens: list[int]) -> str: ...

    def generate(self, prompts: list[list[int]], max_new_tokens: list[int]) -> list[list[int]]:
        """Greedy continuations, one per prompt, each exactly max_new_tokens[i] long."""
        ...


@dataclass
class TextRequest:
    tokens: list[int]
    max_new_tokens: int


class TextEngine:
    kind = "text"

    def __init__(self, generator: TextGenerator, cfg: ServeConfig) -> None:
        self.generator, self.default_new_tokens = generator, cfg.max_new_tokens

    def parse(self, body: Any) -> TextRequest:
        if not isinstance(body, dict):
            raise RequestError('expected a JSON object like {"prompt": "text", "max_new_tokens": 16}')
        unknown = set(body) - {"prompt", "tokens", "max_new_tokens"}
        if unknown:
            raise RequestError(
                f"unknown field(s) {sorted(unknown)}; expected prompt or tokens, max_new_tokens"
            )
        most = self.default_new_tokens
        budget = body.get("max_new_tokens", most)
        if not isinstance(budget, int) or isinstance(budget, bool) or not 1 <= budget <= most:
            raise RequestError(f"max_new_tokens={budget!r}: must be an integer in [1, {most}]")
        if ("prompt" in body) == ("tokens" in body):
            raise RequestError("give exactly one of prompt (text) or tokens (a list of token ids)")
        if "prompt" in body:
            if not isinstance(body["prompt"], str) or not body["prompt"]:
                raise RequestError("prompt must be a non-empty string")
            tokens = self.generator.encode(body["prompt"])
        else:
            tokens = body["tokens"]
            vocab = self.generator.vocab_size
            if (
                not isinstance(tokens, list)
                or not tokens
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens)
            ):
                raise RequestError(f"tokens must be a non-empty list of integers in [0, {vocab})")
        if len(tokens) + budget > self.generator.max_len:
            raise RequestError(
                f"too long: {len(tokens)} prompt tokens + max_new_tokens={budget} > the model's context of "
                f"{self.generator.max_len} tokens; shorten the prompt or ask for fewer tokens",
                status=413,
            )
        return TextRequest(tokens, budget)

    def run_batch(self, requests: list[TextRequest]) -> list[dict[str, Any]]:
        outputs = self.generator.generate([r.tokens for r in requests], [r.max_new_tokens for r in requests])
        return [{"tokens": out, "completion": self.generator.decode(out)} for out in outputs]


class TensorEngine:
    kind = "tensor"

    def __init__(self, model: nn.Module, example: torch.Tensor, device: torch.device) -> None:
        self.model, self.device = model, device
        self.shape, self.dtype = tuple(example.shape), example.dtype

    def parse(self, body: Any) -> torch.Tensor:
        if not isinstance(body, dict) or set(body) != {"input"}:
            raise RequestError(
                f'expected a JSON object {{"input": ...}} with a tensor of shape {list(self.shape)}'
            )
        try:
            x = torch.tensor(body["input"], dtype=self.dtype)
        except (TypeError, ValueError, RuntimeError) as err:
            raise RequestError(f"input is not a numeric array ({err})") from None
        if tuple(x.shape) != self.shape:
            raise RequestError(f"input has shape {list(x.shape)}, the model takes {list(self.shape)}")
        return x

    @torch.no_grad()
    def run_batch(self, inputs: list[torch.Tensor]) -> list[dict[str, Any]]:
        outputs = self.model(torch.stack(inputs).to(self.device)).float().cpu()
        answers = []
        for row in outputs:
            answer: dict[str, Any] = {"output": row.tolist()}
            if row.dim() == 1:
                answer["prediction"] = int(row.argmax())
            answers.append(answer)
        return answers


def build_engine(
    model: nn.Module, recipe: Any, cfg: ServeConfig, device: torch.device
) -> TextEngine | TensorEngine:
    """The engine the recipe asks for: its `generator` hook if it has one, else tensor in/out."""
    hook = getattr(recipe, "generator", None)
    if hook is not None:
        return TextEngine(hook(model), cfg)
    dataset = recipe.eval_dataset() or recipe.train_dataset()
    return TensorEngine(model, dataset[0][0], device)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
