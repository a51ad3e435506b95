// Package kexec loads a new kernel with kexec_file_load (which works with
// signed kernels and under lockdown) and reboots into it, and says in an
// operator's words why the running kernel refused one.
package kexec

import (
	"errors"
	"fmt"
	"os"

	ukexec "github.com/u-root/u-root/pkg/boot/kexec"
	"golang.org/x/sys/unix"
)

// Load loads kernel and initrd with cmdline as the next kernel. Nothing is
// changed if it fails.
func Load(kernel, initrd, cmdline string) error {
	k, err := os.Open(kernel)
	if err != nil {
		return fmt.Errorf("kernel: %w", err)
	}
	defer k.Close()
	var rd *os.File
	if initrd != "" {
		if rd, err = os.Open(initrd); err != nil {
			return fmt.Errorf("initramfs: %w", err)
		}
		defer rd.Close()
	}
	if err := ukexec.FileLoad(k, rd, cmdline); err != nil {
		return Explain(err)
	}
	return nil
}

// Unload drops a loaded kexec image (the inverse of Load).
func Unload() error {
	if err := unix.KexecFileLoad(-1, -1, "", unix.KEXEC_FILE_UNLOAD); err != nil {
		return fmt.Errorf("unloading the kexec image: %w", err)
	}
	return nil
}

// Loaded tells whether a kexec image is loaded (/sys/kernel/kexec_loaded).
func Loaded() bool {
	b, err := os.ReadFile("/sys/kernel/kexec_loaded")
	return err == nil && len(b) > 0 && b[0] == '1'
}

// Reboot jumps into the loaded kernel. It returns only on failure.
func Reboot() error {
	unix.Sync()
	return ukexec.Reboot()
}

// Explain turns a kexec_file_load error into what it means and what to do.
func Explain(err error) error {
	var hint string
	switch {
	case errors.Is(err, unix.EPERM):
		hint = "kexec is not allowed: run as root, and check kernel.kexec_load_disabled (once 1 it stays 1 until reboot) and lockdown"
	case errors.Is(err, unix.EKEYREJECTED), errors.Is(err, unix.EBADMSG):
		hint = "the kernel's signature was rejected: under lockdown or secure boot only a kernel signed with a trusted key can be loaded"
	case errors.Is(err, unix.ENOEXEC):
		hint = "not a bootable kernel image for this machine (bzImage expected)"
	case errors.Is(err, unix.ETXTBSY):
		hint = "the kernel or initramfs file is open for writing somewhere: wait for the copy to finish"
	case errors.Is(err, unix.EBUSY):
		hint = "another kexec image is being loaded"
	case errors.Is(err, unix.ENOSYS):
		hint = "this kernel has no kexec_file_load (CONFIG_KEXEC_FILE)"
	case errors.Is(err, unix.ENOMEM), errors.Is(err, unix.E2BIG):
		hint = "the kernel and initramfs do not fit where kexec can place them"
	case errors.Is(err, unix.EINVAL):
		hint = "the kernel refused the image or command line (too long, or a bad image)"
	default:
		return fmt.Errorf("kexec_file_load: %w", err)
	}
	return fmt.Errorf("kexec_file_load refused the new kernel: %s: %w", hint, err)
}
