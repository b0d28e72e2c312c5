import torch

from dinov2.configuration.recipes import load_recipe
from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.datasets import ImageFolderDataset
from dinov2.data.loaders import make_pretraining_loader
from dinov2.data.samplers import ResumableInfiniteSampler
from dinov2.train.activation_checkpointing import checkpoint_blocks
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.train import make_collate


def saved_bytes_loss_and_gradients(meta: SSLMetaArch, batch: dict) -> tuple[int, float, dict[str, torch.Tensor]]:
    """Bytes autograd keeps for the backward pass (each storage once), the loss, the student's gradients."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(0)  # drop path
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = meta(batch, teacher_temp=0.04)
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in meta.student.named_parameters() if p.grad is not None}
    return sum(storages.values()), loss.item(), gradients


def test_recomputed_blocks_give_the_same_loss_and_gradients_with_less_kept_memory(image_folder):
    recipe = load_recipe("cpu_tiny", ["train.batch_size=8"])  # 4 blocks, drop path 0.1
    crops = recipe.crops
    augmentation = DataAugmentationDINO(
        crops.global_crops_scale, crops.local_crops_scale, crops.local_crops_number, crops.global_crops_size,
        crops.local_crops_size,
    )  # fmt: skip
    dataset = ImageFolderDataset(image_folder(20, 10) / "test", transform=augmentation)
    sampler = ResumableInfiniteSampler(len(dataset), 8, seed=0)
    batch = next(iter(make_pretraining_loader(dataset, sampler, 8, make_collate(recipe))))

    torch.manual_seed(0)
    plain = SSLMetaArch(recipe).train()
    torch.manual_seed(0)
    recomputed = SSLMetaArch(recipe).train()
    assert checkpoint_blocks([recomputed.student]) == 4
    assert recomputed.student.state_dict().keys() == plain.student.state_dict().keys()

    plain_bytes, plain_loss, plain_gradients = saved_bytes_loss_and_gradients(plain, batch)
    recomputed_bytes, recomputed_loss, recomputed_gradients = saved_bytes_loss_and_gradients(recomputed, batch)
    print(f"kept for backward: {plain_bytes / 2**20:.1f} MiB plain, {recomputed_bytes / 2**20:.1f} MiB recomputed")
    assert recomputed_loss == plain_loss
    assert recomputed_gradients.keys() == plain_gradients.keys()
    for name, gradient in plain_gradients.items():  # the same float operations replayed: bitwise equal
        assert torch.equal(recomputed_gradients[name], gradient), name
    assert recomputed_bytes < 0.5 * plain_bytes
