# The Azure plugin, for Packer 1.7 and later (where builders are plugins). Packer 1.6
# (Debian 12's package, which CI uses to validate offline) has azure-arm built in and
# does not know this block, so scripts/check-packaging validates the other files only.
packer {
  required_version = ">= 1.6.6"
  required_plugins {
    azure = {
      source  = "github.com/hashicorp/azure"
      version = ">= 2.0.0"
    }
  }
}
