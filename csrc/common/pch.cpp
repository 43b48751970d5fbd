// Anchors the precompiled header (csrc/common/pch.h) that the other libraries reuse.
