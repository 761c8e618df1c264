"""Multi-task architectures that are not grouping methods: Cross-stitch (Misra et al. 2016) and MTAN
(Liu et al. 2019), over the registered backbones. Importing the package registers both methods."""

from taskgrouping.methods.architectures.cross_stitch import CrossStitchNetwork, CrossStitchOptions, cross_stitch
from taskgrouping.methods.architectures.mtan import MTANNetwork, mtan

__all__ = ["CrossStitchNetwork", "CrossStitchOptions", "cross_stitch", "MTANNetwork", "mtan"]
