"""The frozen reference policy for KL, on its own actor: loaded only when algorithm.kl_coef > 0."""
from __future__ import annotations

import torch

from rl.logprobs import token_logprobs
from policies.vision import MM_KEYS
from policies.vision import model_inputs as vision_inputs


class ReferencePolicy:
    def __init__(self, model_path: str, dtype: str = "float32", micro_batch_size: int = 64,
                 chunk_tokens: int = 4096, num_threads: int = 1):
        from policies.build import auto_model_class

        torch.set_num_threads(num_threads)
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.model = auto_model_class(model_path).from_pretrained(model_path, dtype=torch_dtype).to(self.device)
        self.model.eval().requires_grad_(False)
        self.micro, self.chunk = micro_batch_size, chunk_tokens

    @torch.no_grad()
    def logprobs(self, batch: dict) -> torch.Tensor:
        """Reference logprobs [B, T-1] for the whole batch (0 past each sequence's end)."""
        ids, lengths = batch["input_ids"], batch["lengths"]
        B, T = ids.shape
        out = torch.zeros(B, T - 1)
        for start in range(0, B, self.micro):
            L = int(lengths[start : start + self.micro].max())
            mb = {k: batch[k][start : start + self.micro].to(self.device) for k in MM_KEYS if k in batch}
            mb["input_ids"] = ids[start : start + self.micro, :L].to(self.device)
            lp = token_logprobs(self.model, mb["input_ids"], self.chunk, fused=True,  # GPU: no fp32 logits
                                **vision_inputs(self.model, mb))
            out[start : start + self.micro, : L - 1] = lp.float().cpu()
        return out

    def ready(self) -> bool:
        return True
