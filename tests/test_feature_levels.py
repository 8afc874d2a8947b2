""" Dense-prediction builders keep the backbone they are given: levels by stride, graph modules kept. """
import pytest

import dgmn_timm  # noqa: F401
from dgmn_timm.layers import DGMN, RepGraph
from dgmn_timm.tasks.detection import fasterrcnn_dgmn2, feature_levels, retinanet_dgmn2
from dgmn_timm.tasks.segmentation import create_segmentation_model


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


def test_retinanet_on_resnet_dgmn_c5_reads_strides_8_to_32_and_keeps_dgmn():
    model = retinanet_dgmn2('resnet50_dgmn_c5', num_classes=3)
    assert model.backbone.body.reductions == [8, 16, 32]
    assert model.backbone.strides == [8, 16, 32, 64, 128]
    assert _count(model, DGMN) > 0


def test_faster_rcnn_on_resnet_repgraph_reads_strides_4_to_32_and_keeps_repgraph():
    model = fasterrcnn_dgmn2('resnet50_repgraph', num_classes=3)
    assert model.backbone.body.reductions == [4, 8, 16, 32]
    assert _count(model, RepGraph) == 1


def test_levels_that_drop_every_graph_module_are_refused():
    with pytest.raises(ValueError, match=r'layer1, layer2, layer3 of resnet50_dgmn_c5 leave out all its graph '
                                         r'modules \(DGMN in layer4\); give out_indices that reach layer4'):
        retinanet_dgmn2('resnet50_dgmn_c5', num_classes=3, out_indices=(1, 2, 3))
    with pytest.raises(ValueError, match='RepGraph in layer3'):
        feature_levels('resnet50_repgraph', (0, 1, 2))
    # a backbone without graph modules takes any levels
    assert feature_levels('resnet18', (0, 1)) == (0, 1)


@pytest.mark.parametrize('name, strides, kwargs, levels', [
    ('resnet18', (8, 16, 32), {}, (2, 3, 4)),  # a plain timm ResNet: layer2-layer4
    ('dgmn2_tiny', (8, 16, 32), {}, (1, 2, 3)),
    ('dgmn2_tiny', (4, 8, 16, 32), {}, (0, 1, 2, 3)),
    ('resnet50_repgraph', (4, 8, 16, 32), dict(output_stride=8), (1, 4)),  # dilated: the deepest of stride 8
    ('dgmn2_tiny', (8,), dict(output_stride=8), (3,)),
    ('resnet18', (16,), dict(output_stride=16), (4,)),
])
def test_levels_by_stride(name, strides, kwargs, levels):
    assert feature_levels(name, None, strides, **kwargs) == levels


def test_a_stride_the_backbone_lacks_is_one_error():
    with pytest.raises(ValueError, match='no feature level of stride 8 .*its strides: 16.*give out_indices'):
        feature_levels('vit_tiny_patch16_224', None, (8, 16, 32))


def test_segmentation_heads_keep_the_graph_modules():
    fcn = create_segmentation_model('resnet50_dgmn_c5', num_classes=3, head='fcn')  # output stride 8: layer4
    assert fcn.backbone.reductions == [8] and _count(fcn, DGMN) > 0
    fpn = create_segmentation_model('resnet50_dgmn_c5', num_classes=3, head='fpn')
    assert fpn.backbone.reductions == [4, 8, 16, 32] and _count(fpn, DGMN) > 0
