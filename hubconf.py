""" torch.hub entry points: one per model registered by the dgmn_timm package.

    import torch
    print(torch.hub.list('OWNER/dgmn-timm'))
    model = torch.hub.load('OWNER/dgmn-timm', 'dgmn2_tiny', pretrained=True)
    model = torch.hub.load('/path/to/dgmn-timm', 'dgmn2_tiny', source='local', num_classes=10)

The entry points are discovered from timm's registry (every model whose registering module lies inside
the dgmn_timm package), so model families added later appear here automatically. Each takes
``pretrained``, ``checkpoint_path``, ``num_classes``, ``features_only`` and any other
``timm.create_model`` argument; ``torch.hub.help`` shows the details.
"""
dependencies = ['torch', 'timm', 'huggingface_hub', 'safetensors']

from dgmn_timm.hub import hub_entrypoint as _hub_entrypoint, package_models as _package_models  # noqa: E402


def _add_entrypoints(namespace: dict) -> None:
    for name in _package_models():
        namespace[name] = _hub_entrypoint(name)


_add_entrypoints(globals())
