""" torch.hub entry points: one per model registered by the dgmn_timm package.

    model = torch.hub.load('OWNER/dgmn-timm', 'dgmn2_tiny', pretrained=True)
    model = torch.hub.load('/path/to/dgmn-timm', 'dgmn2_tiny', source='local', checkpoint_path='dgmn2_tiny.pth')
"""
dependencies = ['torch', 'timm', 'huggingface_hub', 'safetensors']

from dgmn_timm.weights.hub import hub_entrypoint as _entrypoint, package_models as _package_models  # noqa: E402

globals().update({name: _entrypoint(name) for name in _package_models()})
