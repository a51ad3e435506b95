// Command mkinitrd writes a small newc initramfs (gzip-compressed) that holds
// one static program as /init and, optionally, more files. It builds the test
// guest's initramfs without root and without external tools.
//
//	mkinitrd -o guest.cpio.gz -init ./heartbeat [-file /etc/x=./x …] [-bin /usr/sbin/qemu-ga=/usr/sbin/qemu-ga …]
//
// -bin adds a dynamically linked program together with its ELF interpreter
// and shared libraries (found with u-root's ldd), at their own paths.
package main

import (
	"compress/gzip"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/u-root/u-root/pkg/cpio"
	"github.com/u-root/u-root/pkg/ldd"
)

type fileList []string

func (f *fileList) String() string     { return strings.Join(*f, ",") }
func (f *fileList) Set(v string) error { *f = append(*f, v); return nil }

func main() {
	out := flag.String("o", "", "output file (gzip-compressed newc cpio)")
	initBin := flag.String("init", "", "program to install as /init")
	var extra, bins fileList
	flag.Var(&extra, "file", "extra file as DEST=SRC (repeatable)")
	flag.Var(&bins, "bin", "program as DEST=SRC, with its shared libraries (repeatable)")
	flag.Parse()
	if *out == "" || *initBin == "" {
		fmt.Fprintln(os.Stderr, "mkinitrd: -o and -init are required")
		flag.Usage()
		os.Exit(2)
	}
	for _, b := range bins {
		_, src, ok := strings.Cut(b, "=")
		if !ok {
			fmt.Fprintf(os.Stderr, "mkinitrd: -bin %q: want DEST=SRC\n", b)
			os.Exit(2)
		}
		libs, err := ldd.FList(src)
		if err != nil {
			fmt.Fprintf(os.Stderr, "mkinitrd: libraries of %s: %v\n", src, err)
			os.Exit(1)
		}
		extra = append(extra, b)
		for _, l := range libs {
			if l != src {
				extra = append(extra, l+"="+l)
			}
		}
	}
	if err := run(*out, *initBin, extra); err != nil {
		fmt.Fprintln(os.Stderr, "mkinitrd:", err)
		os.Exit(1)
	}
}

func run(out, initBin string, extra []string) error {
	files := []string{"init=" + initBin}
	files = append(files, extra...)
	var recs []cpio.Record
	for _, d := range []string{"dev", "proc", "sys", "tmp", "run"} {
		recs = append(recs, cpio.Directory(d, 0o755))
	}
	recs = append(recs, cpio.CharDev("dev/console", 0o600, 5, 1))
	seen := map[string]bool{}
	for _, spec := range files {
		dst, src, ok := strings.Cut(spec, "=")
		if !ok {
			return fmt.Errorf("file %q: want DEST=SRC", spec)
		}
		if seen[dst] {
			continue
		}
		seen[dst] = true
		b, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		st, err := os.Stat(src)
		if err != nil {
			return err
		}
		recs = append(recs, cpio.StaticFile(strings.TrimPrefix(dst, "/"), string(b), uint64(st.Mode().Perm())))
	}
	cpio.MakeAllReproducible(recs)

	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	zw := gzip.NewWriter(f)
	w := cpio.Newc.Writer(zw)
	if err := cpio.WriteRecordsAndDirs(w, recs); err != nil {
		return fmt.Errorf("writing archive: %w", err)
	}
	if err := cpio.WriteTrailer(w); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, out)
}
