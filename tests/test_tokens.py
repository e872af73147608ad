import torch

from lightning_rlhf.tokens import left_pad, real_token_positions


def test_left_padded_rows_get_the_positions_of_their_unpadded_tokens():
    ids, mask = left_pad([[7, 8, 9], [4], [1, 2, 3, 4, 5]], pad_id=0)
    assert ids.tolist() == [[0, 0, 7, 8, 9], [0, 0, 0, 0, 4], [1, 2, 3, 4, 5]]
    # by hand: real tokens count 0, 1, 2, ... from each row's first one; leading padding stays at 0
    assert real_token_positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4]]
    gapped = torch.tensor([[0, 1, 1, 0, 1]])  # a prompt, a gap of padding, a continuation (score_pairs' layout)
    assert real_token_positions(gapped).tolist() == [[0, 0, 1, 1, 2]]  # the gap repeats 1, masked out anyway
