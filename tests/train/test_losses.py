"""DINO, iBOT and KoLeo on cases small enough to work out by hand."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov2.layers.dino_head import DINOHead
from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss, sinkhorn_knopp


def test_dino_loss_of_a_uniform_student_is_log_k_per_pair():
    loss = DINOLoss(out_dim=3)
    student = [torch.zeros(2, 3), torch.zeros(2, 3)]
    teacher = [torch.tensor([[1.0, 0, 0], [0.2, 0.3, 0.5]]), torch.tensor([[0, 1.0, 0], [0, 0, 1.0]])]
    # every (student crop, teacher crop) pair costs log 3; 2 x 2 pairs
    torch.testing.assert_close(loss(student, teacher), torch.tensor(4 * math.log(3)))


def test_dino_loss_uses_the_student_temperature():
    loss = DINOLoss(out_dim=3, student_temp=0.1)
    student = torch.tensor([[0.1 * math.log(2), 0.0, 0.0]])  # / 0.1 -> softmax (1/2, 1/4, 1/4)
    teacher = torch.tensor([[1.0, 0.0, 0.0]])
    torch.testing.assert_close(loss([student], [teacher]), torch.tensor(math.log(2)))


def test_centering_subtracts_the_center_and_updates_it_by_ema():
    loss = DINOLoss(out_dim=2, center_momentum=0.9)
    teacher = torch.tensor([[1.0, 3.0], [3.0, 5.0]])
    # center 0: softmax of (1, 3)/1 and (3, 5)/1
    probs = loss.softmax_center_teacher(teacher, teacher_temp=1.0)
    torch.testing.assert_close(probs[0], torch.softmax(torch.tensor([1.0, 3.0]), 0))
    loss.update_center(teacher)  # batch mean (2, 4): center = 0.9 * 0 + 0.1 * (2, 4)
    torch.testing.assert_close(loss.center, torch.tensor([[0.2, 0.4]]))
    loss.update_center(teacher)
    torch.testing.assert_close(loss.center, torch.tensor([[0.38, 0.76]]))
    shifted = loss.softmax_center_teacher(torch.tensor([[0.38, 0.76]]), teacher_temp=0.5)
    torch.testing.assert_close(shifted, torch.tensor([[0.5, 0.5]]))


def test_sinkhorn_knopp_gives_rows_that_sum_to_one_and_balanced_prototypes():
    torch.manual_seed(0)
    logits = torch.randn(64, 8)
    assignments = sinkhorn_knopp(logits, teacher_temp=1.0, n_samples=64, n_iterations=3)
    torch.testing.assert_close(assignments.sum(dim=1), torch.ones(64))
    prototype_mass = assignments.sum(dim=0)
    assert torch.all((prototype_mass - 8.0).abs() < 0.1)  # B/K = 8 each, after 3 iterations
    converged = sinkhorn_knopp(logits, teacher_temp=1.0, n_samples=64, n_iterations=100)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((8,), 8.0), atol=1e-4, rtol=0)
    assert assignments.dtype == torch.float32
    uniform = sinkhorn_knopp(torch.zeros(4, 5, dtype=torch.bfloat16), teacher_temp=0.04, n_samples=4)
    torch.testing.assert_close(uniform, torch.full((4, 5), 0.2))


def test_sinkhorn_knopp_survives_sharp_temperatures():
    logits = torch.tensor([[50.0, 0.0], [0.0, 50.0]])
    assignments = sinkhorn_knopp(logits, teacher_temp=0.04, n_samples=2)  # exp(1250) would overflow
    assert torch.isfinite(assignments).all()
    torch.testing.assert_close(assignments, torch.eye(2))


def test_ibot_masked_form_equals_the_dense_form():
    torch.manual_seed(0)
    student, teacher_logits = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    teacher = torch.softmax(teacher_logits, dim=-1)
    masks = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    loss = iBOTPatchLoss(patch_out_dim=5)
    dense = loss(student, teacher, masks)
    gathered = loss.forward_masked(student[masks], teacher[masks], student_masks_flat=masks)
    torch.testing.assert_close(gathered, dense)
    # per image mean over its masked patches, then mean over the 3 images (one has none)
    per_patch = -(teacher * torch.log_softmax(student / 0.1, dim=-1)).sum(-1)
    by_hand = (per_patch[0, [0, 3]].mean() + 0 + per_patch[2, :3].mean()) / 3
    torch.testing.assert_close(dense, by_hand)


def test_ibot_center_is_the_mean_over_masked_patches():
    loss = iBOTPatchLoss(patch_out_dim=2, center_momentum=0.5)
    loss.update_center(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    torch.testing.assert_close(loss.center, torch.tensor([[[1.0, 2.0]]]))
    loss.update_center(torch.zeros(0, 2))  # no masked patch in the batch: the centre stays as it was
    torch.testing.assert_close(loss.center, torch.tensor([[[1.0, 2.0]]]))


def test_koleo_on_three_points_of_a_circle():
    points = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])  # normalised: 0, 90, 180 degrees
    # every point's nearest neighbour is 90 degrees away: distance sqrt(2)
    torch.testing.assert_close(KoLeoLoss()(points), torch.tensor(-math.log(math.sqrt(2))), atol=1e-6, rtol=0)


def test_koleo_at_batch_size_one_is_zero_and_has_a_finite_gradient():
    features = torch.randn(1, 8, requires_grad=True)
    value = KoLeoLoss()(features)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(features.grad).all()


def test_dino_head_shapes_gain_and_normalised_prototypes():
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=10, hidden_dim=32, bottleneck_dim=8)
    assert set(head.state_dict()) >= {"last_layer.weight_g", "last_layer.weight_v", "mlp.0.weight", "mlp.4.weight"}
    assert torch.equal(head.last_layer.weight_g, torch.ones(10, 1))
    inputs = torch.randn(4, 16)
    out = head(inputs)
    assert out.shape == (4, 10)
    # bottleneck is L2-normalised and prototypes have norm g = 1: every logit is a cosine
    assert out.abs().max() <= 1.0 + 1e-6
    with torch.no_grad():
        head.last_layer.weight_v.mul_(7.0)  # the direction, not the scale of v, matters
    torch.testing.assert_close(head(inputs), out)
    with torch.no_grad():
        head.last_layer.weight_g.fill_(2.0)  # the gain scales every logit
    torch.testing.assert_close(head(inputs), 2 * out)


def _rank_sinkhorn_and_centers(rank: int, world: int, port: int, logits: torch.Tensor, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shard = logits.chunk(world)[rank]
    assignments = sinkhorn_knopp(shard, teacher_temp=0.5, n_samples=logits.shape[0])
    dino = DINOLoss(out_dim=logits.shape[1])
    dino.update_center(shard)
    ibot = iBOTPatchLoss(patch_out_dim=logits.shape[1])
    masked = shard[: rank + 1]  # ranks hold different numbers of masked patches
    ibot.update_center(masked)
    # numpy arrays travel by value; a tensor would travel as a shared-memory handle that the parent fetches from
    # this process, which may have exited by then (connection reset)
    queue.put((rank, *(tensor.detach().numpy().copy() for tensor in (assignments, dino.center, ibot.center))))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_compute_the_same_targets_and_centers_as_one_process(unused_port):
    torch.manual_seed(0)
    logits = torch.randn(8, 6)
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = unused_port()
    processes = [context.Process(target=_rank_sinkhorn_and_centers, args=(r, 2, port, logits, queue)) for r in range(2)]
    for process in processes:
        process.start()
    results = sorted(queue.get(timeout=120) for _ in processes)
    results = [(rank, *(torch.from_numpy(array) for array in arrays)) for rank, *arrays in results]
    for process in processes:
        process.join(timeout=60)
    single = sinkhorn_knopp(logits, teacher_temp=0.5, n_samples=8)
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), single)
    reference_center = DINOLoss(out_dim=6)
    reference_center.update_center(logits)
    torch.testing.assert_close(results[0][2], reference_center.center)
    masked_all = torch.cat([logits[:1], logits[4:6]])  # rank 0 had 1 masked patch, rank 1 had 2
    torch.testing.assert_close(results[1][3], 0.1 * masked_all.mean(dim=0).view(1, 1, -1))
