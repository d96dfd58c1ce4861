"""Every longctx method inside lm-evaluation-harness (`pip install -e ".[harness]"`): model `longctx`, the harness's
own HuggingFace model class (`HFLM`, so its batching, loglikelihood, generate_until and chat templates are the
harness's) on a model loaded by `longctx.load_model` with a longctx method applied.

    python -m longctx.harness --model longctx --device cuda \\
        --model_args pretrained=embedded,method=longheads,atten_length=2048,max_length=32768 --tasks ruler ...

(`lm_eval` itself discovers no plugins, so `python -m longctx.harness` is its command line with `longctx`
registered; from Python, `import longctx.harness` and then `lm_eval.simple_evaluate(model="longctx", ...)`.)

`pretrained` is `embedded` (SmolLM2-135M-Instruct), `embedded:<name>` (`embedded:gemma3`), a local folder or a hub
id. Keys that are fields of the method's dataclass (`atten_length`, `chunk_size`, `factor`...) configure the method;
the others go to `HFLM`. `max_length` is passed to the harness explicitly: left unset, the harness falls back to the
config's `max_position_embeddings` and silently cuts every longer prompt from the left, which would hide exactly
what a long-context method is for. It is required for every method but `full` (whose default is the model's
trained length) and is checked against the method before anything runs.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError:  # the extra is optional: say how to get it, in one line
    raise ImportError('the lm-evaluation-harness adapter needs the harness: pip install -e ".[harness]"') from None

from longctx.methods.base import AttentionMethod
from longctx.models import load_model
from longctx.methods.method import parameters, refuse_renamed
from longctx.registry import METHODS, build_method

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = {"embedded": "embedded:smollm2"}
# HFLM arguments that a pre-loaded model makes meaningless (longctx.load_model already decided them)
_LOADING_ARGUMENTS = {"pretrained", "revision", "subfolder", "tokenizer", "dtype", "device", "parallelize",
                      "max_memory_per_gpu", "max_cpu_memory", "offload_folder", "tp_plan", "peft", "delta",
                      "autogptq", "gptqmodel", "gguf_file", "trust_remote_code", "use_fast_tokenizer", "max_length",
                      "backend", "self"}


def harness_arguments() -> set[str]:
    """The HFLM arguments that still apply to a pre-loaded model (batch_size, add_bos_token, truncation...)."""
    return set(inspect.signature(HFLM.__init__).parameters) - _LOADING_ARGUMENTS - {"kwargs"}


@register_model("longctx")
class LongctxLM(HFLM):
    """HFLM over `longctx.load_model(pretrained)` with `method` applied for the lifetime of this object."""

    def __init__(
        self,
        pretrained: str = "embedded",
        method: str = "full",
        max_length: int | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 1,
        **options: Any,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"longctx: unknown method {method!r}; valid: {', '.join(sorted(METHODS))}")
        refuse_renamed(f"longctx: method {method}", METHODS[method].renamed, options)
        method_fields = {field.name for field in parameters(METHODS[method])}
        harness = harness_arguments()
        unknown = sorted(set(options) - method_fields - harness)
        if unknown:
            raise ValueError(f"longctx: {', '.join(unknown)} is neither a parameter of method {method!r} "
                             f"({', '.join(sorted(method_fields)) or 'none'}) nor an HFLM argument")
        self.method = build_method(method, **{k: v for k, v in options.items() if k in method_fields})
        if max_length is None and method != "full":
            raise ValueError(f"longctx: pass max_length=<tokens> with method={method} (without it the harness cuts "
                             "prompts to the model's max_position_embeddings, hiding the method)")
        if isinstance(self.method, AttentionMethod) and str(batch_size) != "1":
            raise ValueError(f"longctx: method {method} runs one sequence at a time (no padded batches): use batch_size=1")
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's command line always passes --device (default cuda:0); HFLM then falls back to what exists
            log.warning("longctx: device %s asked for but no CUDA GPU is visible; running on the CPU", device)
            device = "cpu"
        self.loaded = load_model(EMBEDDED_ALIASES.get(pretrained, pretrained), device=device, dtype=dtype)
        max_length = int(max_length or self.loaded.pretrained_length)
        self.installation = self.method.apply(self.loaded, max_length)
        super().__init__(
            pretrained=self.loaded.model, tokenizer=self.loaded.tokenizer, max_length=max_length,
            batch_size=batch_size, **{k: v for k, v in options.items() if k in harness},
        )

    def remove_method(self) -> None:
        """Restore the model exactly."""
        self.installation.remove()


def main() -> None:
    """lm_eval's command line with model `longctx` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
