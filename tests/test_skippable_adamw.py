"""engine.SkippableAdamW: the trainer skips a step through methods, not by setting attributes."""
import torch

from mmpretrain.engine import SkippableAdamW


def test_skip_next_step_and_clear_skip():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SkippableAdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.skip_next_step()
    opt.step()
    assert opt.overflow and torch.equal(p.detach(), torch.ones(3))  # skipped, reported as an overflow
    opt.step()  # the skip was for one step only
    assert not opt.overflow and not torch.equal(p.detach(), torch.ones(3))
    before = p.detach().clone()
    opt.skip_next_step()
    opt.clear_skip()  # e.g. a wrapper skipped on its own and never called step()
    opt.step()
    assert not opt.overflow and not torch.equal(p.detach(), before)
