# Copyright (c) mmbhvit contributors. Licensed under the Apache License 2.0.
from .official import (OfficialConversion, convert_official_state_dict,
                       official_flags_to_backbone_cfg)

__all__ = ['OfficialConversion', 'convert_official_state_dict',
           'official_flags_to_backbone_cfg']
