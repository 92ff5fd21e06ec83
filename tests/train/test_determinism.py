"""Runs repeat bit for bit on CPU (same threads, same seed): the basis of checkpoint-resume equality."""
import torch

from fastdni.nn import SyntheticGradient


def test_label_context_gradient_is_bitwise_repeatable():
    # Advanced-indexing backward accumulates with atomics on CPU; the label gather must not use it.
    sg = SyntheticGradient(256, context_features=10)
    torch.nn.init.normal_(sg.context_weight)
    h = torch.randn(512, 256)
    labels = torch.randint(0, 10, (512,))
    upstream = torch.randn(512, 256)

    def grad():
        sg.zero_grad(set_to_none=True)
        sg(h, labels).backward(upstream)
        return sg.context_weight.grad.clone()

    first = grad()
    assert all(torch.equal(first, grad()) for _ in range(50))
