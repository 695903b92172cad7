# The failback relay's Azure VM image: Debian 12 (Gen2) with the failback-relay package
# installed and enabled but not configured (cloud-init's user-data configures it at
# first boot: packaging/cloud-init/relay-user-data.yaml). Built by `packer build`
# (docs/DEPLOY-AZURE.md); `packer validate` and `packer fmt -check` run in CI.
#
# What the image keeps and changes:
# - the Azure Linux agent (waagent) and cloud-init of the Debian image, as Azure needs;
# - no swap at all: none on the OS disk, and waagent makes none on the resource disk
#   (a relay under memory pressure must be seen, not paged);
# - the serial console on ttyS0 (kernel and getty), for Azure's serial console;
# - last, `waagent -deprovision+user`: the build VM's user, host keys and DHCP
#   leases go, so every VM made from the image is new.

locals {
  image_name = "${var.image_name}-${replace(var.package_version, "~", "-")}"
}

source "azure-arm" "relay" {
  subscription_id                   = var.subscription_id
  client_id                         = var.client_id
  client_secret                     = var.client_secret
  tenant_id                         = var.tenant_id
  use_azure_cli_auth                = var.client_id == ""
  location                          = var.location
  vm_size                           = var.build_vm_size
  os_type                           = "Linux"
  image_publisher                   = "Debian"
  image_offer                       = "debian-12"
  image_sku                         = "12-gen2"
  image_version                     = "latest"
  managed_image_name                = local.image_name
  managed_image_resource_group_name = var.resource_group
  azure_tags = {
    product         = "failback-relay"
    package_version = var.package_version
  }
}

build {
  sources = ["source.azure-arm.relay"]

  provisioner "file" {
    source      = var.relay_deb
    destination = "/tmp/failback-relay.deb"
  }

  provisioner "shell" {
    script          = "provision.sh"
    execute_command = "chmod +x {{ .Path }}; sudo -E sh '{{ .Path }}'"
  }

  provisioner "shell" {
    inline          = ["/usr/sbin/waagent -force -deprovision+user && export HISTSIZE=0 && sync"]
    inline_shebang  = "/bin/sh -x"
    execute_command = "chmod +x {{ .Path }}; sudo -E sh '{{ .Path }}'"
  }
}
