# What a user sets to build the relay image (docs/DEPLOY-AZURE.md): on the command line
# (-var name=value) or in a *.pkrvars.hcl file (-var-file). Credentials come from the
# Azure CLI's login (`az login`) unless a service principal is given.

variable "subscription_id" {
  type        = string
  description = "The Azure subscription the image is built in."
}

variable "resource_group" {
  type        = string
  description = "Existing resource group that receives the managed image."
}

variable "location" {
  type        = string
  default     = "westeurope"
  description = "Azure region of the temporary build VM and of the image."
}

variable "image_name" {
  type        = string
  default     = "failback-relay"
  description = "Name of the managed image (the package version is appended)."
}

variable "relay_deb" {
  type        = string
  description = "Path of the failback-relay .deb to install (./scripts/package builds it in target/debian/)."
}

variable "package_version" {
  type        = string
  description = "Version of that package, for the image's name and tags (dpkg-deb -f <deb> Version)."
}

variable "build_vm_size" {
  type        = string
  default     = "Standard_D2s_v5"
  description = "Size of the temporary VM the image is built on (not the relay's size)."
}

variable "client_id" {
  type        = string
  default     = ""
  description = "Service principal's application id; empty: use the Azure CLI login."
}

variable "client_secret" {
  type        = string
  default     = ""
  sensitive   = true
  description = "Service principal's secret (with client_id)."
}

variable "tenant_id" {
  type        = string
  default     = ""
  description = "Tenant of the service principal (with client_id)."
}
