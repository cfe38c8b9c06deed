"""The book's attention progression: each step equals the next given matching weights."""

import pytest
import torch

from gpt.attention import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention_v1,
    SelfAttention_v2,
    simple_self_attention,
)
from tests.utils import book_named

INPUTS = torch.tensor([[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
                       [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]])  # "Your journey starts with one step"


def test_simple_self_attention_matches_the_book():
    ctx = simple_self_attention(INPUTS)
    torch.testing.assert_close(ctx[1], torch.tensor([0.4419, 0.6515, 0.5683]), atol=1e-4, rtol=0)


def test_v1_weights_copied_to_v2_give_the_same_output():
    torch.manual_seed(789)
    v2 = SelfAttention_v2(3, 2)
    v1 = SelfAttention_v1(3, 2)
    with torch.no_grad():  # nn.Linear stores W^T
        v1.W_query.copy_(v2.W_query.weight.T)
        v1.W_key.copy_(v2.W_key.weight.T)
        v1.W_value.copy_(v2.W_value.weight.T)
    torch.testing.assert_close(v1(INPUTS), v2(INPUTS))
    torch.manual_seed(789)
    torch.testing.assert_close(SelfAttention_v2(3, 2)(INPUTS),
                               torch.tensor([[-0.0739, 0.0713], [-0.0748, 0.0703], [-0.0749, 0.0702],
                                             [-0.0760, 0.0685], [-0.0763, 0.0679], [-0.0754, 0.0693]]),
                               atol=1e-4, rtol=0)  # the book's printed output


def test_causal_attention_is_causal_and_matches_sdpa():
    torch.manual_seed(0)
    ca = CausalAttention(3, 4, context_length=6, dropout=0.0).eval()
    x = torch.stack((INPUTS, INPUTS.flip(0)))  # (2, 6, 3)
    out = ca(x)
    q, k, v = ca.W_query(x), ca.W_key(x), ca.W_value(x)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    x2 = x.clone()
    x2[:, 4:] += 1.0
    torch.testing.assert_close(ca(x2)[:, :4], out[:, :4])


def test_wrapper_equals_multihead_with_matching_weights():
    torch.manual_seed(123)
    d_in, head_dim, num_heads = 3, 2, 3
    wrapper = MultiHeadAttentionWrapper(d_in, head_dim, 6, 0.0, num_heads).eval()
    mha = MultiHeadAttention(d_in, head_dim * num_heads, 6, 0.0, num_heads).eval()
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value"):
            stacked = torch.cat([getattr(h, name).weight for h in wrapper.heads], dim=0)  # (H*hd, d_in)
            getattr(mha, name).weight.copy_(stacked)
        mha.out_proj.weight.copy_(torch.eye(head_dim * num_heads))  # the wrapper has no output projection
        mha.out_proj.bias.zero_()
    x = torch.stack((INPUTS, INPUTS))
    torch.testing.assert_close(mha(x), wrapper(x))


# ---------------------------------------------------------------------------------------------------
# The book's modules against the fused kernels, on both CPU paths: the Triton interpreter (conftest's
# TRITON_INTERPRET=1) and the pure-PyTorch fallback (TRITON_INTERPRET=0). fp32, ≤ 1e-5 relative.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 37])
def test_causal_attention_equals_flash_attention_one_head(kernel_path, T):
    from kernels import flash_attention

    torch.manual_seed(1)
    ca = CausalAttention(d_in=24, d_out=16, context_length=40, dropout=0.0, qkv_bias=True).eval()
    x = torch.randn(2, T, 24)
    want = ca(x)  # (2, T, 16)
    q, k, v = ca.W_query(x)[:, None], ca.W_key(x)[:, None], ca.W_value(x)[:, None]  # (2, 1, T, 16): one head
    got = flash_attention(q, k, v, causal=True)  # (2, 1, T, 16)
    assert got.shape == (2, 1, T, 16)
    torch.testing.assert_close(got[:, 0], want, atol=1e-5, rtol=1e-5)


def test_multihead_attention_equals_fused_causal_self_attention(kernel_path):
    from kernels import CausalSelfAttention

    torch.manual_seed(2)
    d_in, d_out, ctx, heads = 24, 32, 40, 2  # head_dim 16, the kernel's smallest
    mha = MultiHeadAttention(d_in, d_out, ctx, 0.0, heads, qkv_bias=True).eval()
    fused = CausalSelfAttention(d_in, d_out, ctx, 0.0, heads, qkv_bias=True).eval()
    assert set(fused.state_dict()) == set(mha.state_dict())
    fused.load_state_dict(mha.state_dict(), strict=True)

    x = torch.randn(3, 37, d_in)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_fused = mha(x_ref), fused(x_fused)
    torch.testing.assert_close(out_fused, out_ref, atol=1e-5, rtol=1e-5)

    g = torch.randn_like(out_ref)
    out_ref.backward(g)
    out_fused.backward(g)
    torch.testing.assert_close(x_fused.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    grads = book_named((n, p.grad) for n, p in fused.named_parameters())
    for name, p in mha.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_fused_causal_self_attention_loads_a_book_checkpoint_with_its_mask():
    from kernels import CausalSelfAttention

    torch.manual_seed(3)
    mha = MultiHeadAttention(16, 32, 8, 0.0, 2).eval()
    book_sd = {**mha.state_dict(), "mask": torch.triu(torch.ones(8, 8), diagonal=1)}  # the book saves its mask
    fused = CausalSelfAttention(16, 32, 8, 0.0, 2).eval()
    fused.load_state_dict(book_sd, strict=True)
    mha.load_state_dict(book_sd, strict=True)
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(fused(x), mha(x), atol=1e-5, rtol=1e-5)
