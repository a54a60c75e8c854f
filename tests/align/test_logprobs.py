import torch

from align.grpo.logprobs import token_logprobs


def test_chunked_logprobs_equal_naive_values_and_grads():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h1 = torch.randn(3, 7, 16, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    y = torch.randint(0, 50, (3, 7))
    ours, ent = token_logprobs(h1, head, y, temperature=0.7, chunk_tokens=4, with_entropy=True)
    logits = head(h2) / 0.7
    ref = logits.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours, ref)
    p = logits.softmax(-1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1).detach())
    ours.sum().backward()
    g1 = h1.grad.clone()
    head.weight.grad = None
    ref.sum().backward()
    torch.testing.assert_close(g1, h2.grad)
