"""What several methods share, none of it a method: importance passes (Fisher, MAS), masks and their
thresholds, the fixed-mask template (FGGM, random rows), GeRe's general texts."""
